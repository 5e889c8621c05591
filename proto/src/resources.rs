//! The resource model: scalars (`cpus`, `mem` MiB, `disk` MiB, `gpus`, or any other name) and ranges (`ports`),
//! each optionally reserved for a role. This is the only place resource arithmetic and the operator text form
//! (`cpus:4;mem:4096;ports:[31000-32000];cpus(analytics):2`) are implemented.
//!
//! Scalars are stored in thousandths (fixed point, like Mesos) so that repeated add/subtract never drifts.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use crate::v1;

/// Scalars are kept as integer thousandths.
const MILLI: i64 = 1000;

/// Names whose type is fixed; any other name takes its type from the value's form.
const SCALAR_NAMES: [&str; 4] = ["cpus", "mem", "disk", "gpus"];
const RANGE_NAMES: [&str; 1] = ["ports"];

/// An error in a resource string or message, naming the offending token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid resource {token:?}: {reason}")]
pub struct ParseError {
    pub token: String,
    pub reason: String,
}

impl ParseError {
    fn new(token: &str, reason: impl Into<String>) -> Self {
        Self { token: token.to_string(), reason: reason.into() }
    }
}

/// A resource's value.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Value {
    /// Thousandths of a unit.
    Scalar(i64),
    /// Sorted, disjoint, non-adjacent inclusive ranges.
    Ranges(Vec<(u64, u64)>),
}

impl Value {
    fn is_empty(&self) -> bool {
        match self {
            Value::Scalar(v) => *v <= 0,
            Value::Ranges(r) => r.is_empty(),
        }
    }
    fn is_ranges(&self) -> bool {
        matches!(self, Value::Ranges(_))
    }
}

/// A persistent volume carved out of reserved disk: its id and where it appears in a task's sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VolumeSpec {
    pub persistence_id: String,
    pub container_path: String,
}

/// A resource name: the well-known ones are static, so copying resources (which the allocator does on every offer)
/// allocates nothing for them.
type Name = Cow<'static, str>;

fn intern(name: &str) -> Name {
    match SCALAR_NAMES.iter().chain(&RANGE_NAMES).find(|&&known| known == name) {
        Some(known) => Cow::Borrowed(known),
        None => Cow::Owned(name.to_string()),
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Entry {
    name: Name,
    /// `None` is unreserved (`*`). Shared: a copy is a reference count.
    role: Option<Arc<str>>,
    /// Set for a persistent volume (always reserved `disk`).
    volume: Option<VolumeSpec>,
    value: Value,
}

type Key<'a> = (&'a str, Option<&'a str>, Option<&'a VolumeSpec>, bool);

impl Entry {
    fn key(&self) -> Key<'_> {
        (&self.name, self.role.as_deref(), self.volume.as_ref(), self.value.is_ranges())
    }
}

/// A bag of resources. Invariant: entries sorted by (name, role, kind), unique, none empty.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Resources {
    entries: Vec<Entry>,
}

impl Resources {
    /// No resources.
    pub fn new() -> Self {
        Self::default()
    }

    /// Parses the operator text form. Empty input gives empty resources.
    pub fn parse(text: &str) -> Result<Self, ParseError> {
        let mut out = Resources::new();
        for token in text.split(';').map(str::trim).filter(|t| !t.is_empty()) {
            let entry = parse_token(token)?;
            if out.find(entry.key()).is_ok() {
                return Err(ParseError::new(token, format!("{} is given more than once", describe(&entry))));
            }
            out.add_entry(entry);
        }
        Ok(out)
    }

    /// A single unreserved scalar.
    pub fn scalar(name: &str, value: f64) -> Self {
        let mut r = Resources::new();
        r.add_entry(Entry { name: intern(name), role: None, volume: None, value: Value::Scalar(to_milli(value)) });
        r
    }

    /// A persistent volume of `size_mib` reserved for `role`.
    pub fn volume(role: &str, persistence_id: &str, container_path: &str, size_mib: f64) -> Self {
        let mut r = Resources::new();
        r.add_entry(Entry {
            name: intern("disk"),
            role: Some(role.into()),
            volume: Some(VolumeSpec { persistence_id: persistence_id.into(), container_path: container_path.into() }),
            value: Value::Scalar(to_milli(size_mib)),
        });
        r
    }

    /// The persistent volumes in these resources, with their role and size in MiB.
    pub fn volumes(&self) -> Vec<(String, VolumeSpec, f64)> {
        self.entries
            .iter()
            .filter_map(|e| {
                let v = e.volume.clone()?;
                let size = match e.value {
                    Value::Scalar(m) => m as f64 / MILLI as f64,
                    Value::Ranges(_) => 0.0,
                };
                Some((e.role.as_deref().unwrap_or_default().to_string(), v, size))
            })
            .collect()
    }

    /// The same resources with every volume turned back into plain (reserved) disk.
    pub fn without_volumes(&self) -> Resources {
        let mut out = Resources::new();
        for e in &self.entries {
            out.add_entry(Entry { volume: None, ..e.clone() });
        }
        out
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Total of a scalar over all roles (0 when absent).
    pub fn get_scalar(&self, name: &str) -> f64 {
        self.scalar_milli(name) as f64 / MILLI as f64
    }

    /// Total of a scalar over all roles, in thousandths.
    pub fn scalar_milli(&self, name: &str) -> i64 {
        self.entries
            .iter()
            .filter(|e| e.name == name)
            .map(|e| match e.value {
                Value::Scalar(v) => v,
                Value::Ranges(_) => 0,
            })
            .sum()
    }

    /// Every range of `name` over all roles.
    pub fn ranges(&self, name: &str) -> Vec<(u64, u64)> {
        let mut all = Vec::new();
        for e in self.entries.iter().filter(|e| e.name == name) {
            if let Value::Ranges(r) = &e.value {
                all = range_union(&all, r);
            }
        }
        all
    }

    /// The roles these resources are reserved for (without duplicates).
    pub fn reservation_roles(&self) -> Vec<&str> {
        let mut roles: Vec<&str> = self.entries.iter().filter_map(|e| e.role.as_deref()).collect();
        roles.sort_unstable();
        roles.dedup();
        roles
    }

    /// The part usable by a framework in `role`: unreserved resources plus those reserved for `role`.
    pub fn allocatable_to(&self, role: &str) -> Resources {
        self.filter(|e| e.role.as_deref().is_none_or(|r| r == role))
    }

    /// The unreserved part.
    pub fn unreserved(&self) -> Resources {
        self.filter(|e| e.role.is_none())
    }

    /// The part reserved for `role`.
    pub fn reserved_for(&self, role: &str) -> Resources {
        self.filter(|e| e.role.as_deref() == Some(role))
    }

    /// The same resources with every reservation dropped.
    pub fn flatten(&self) -> Resources {
        self.with_role(None)
    }

    /// The same resources, all reserved for `role` (or all unreserved with `None`).
    pub fn with_role(&self, role: Option<&str>) -> Resources {
        let mut out = Resources::new();
        for e in &self.entries {
            // A volume cannot exist unreserved: dropping the role drops the volume too.
            let volume = if role.is_some() { e.volume.clone() } else { None };
            out.add_entry(Entry { role: role.map(Arc::from), volume, ..e.clone() });
        }
        out
    }

    /// The same resources with at most `max_milli` thousandths of scalar `name`: reserved amounts are kept first
    /// (only their role can use them), then unreserved ones; a persistent volume is kept whole or left out.
    pub fn capped(&self, name: &str, max_milli: i64) -> Resources {
        let mut left = max_milli.max(0);
        let mut out = Resources { entries: Vec::with_capacity(self.entries.len()) };
        let named = |e: &&Entry| e.name == name && matches!(e.value, Value::Scalar(_));
        let reserved_first = self.entries.iter().filter(named).filter(|e| e.role.is_some());
        for e in reserved_first.chain(self.entries.iter().filter(named).filter(|e| e.role.is_none())) {
            let Value::Scalar(v) = e.value else { continue };
            let take = if e.volume.is_some() { if v <= left { v } else { 0 } } else { v.min(left) };
            left -= take;
            out.add_entry(Entry { value: Value::Scalar(take), ..e.clone() });
        }
        for e in self.entries.iter().filter(|e| !named(e)) {
            out.add_entry(e.clone());
        }
        out
    }

    /// A range resource (e.g. `ports`) holding `ranges`, unreserved.
    pub fn ranges_of(name: &str, ranges: &[(u64, u64)]) -> Resources {
        let mut r = Resources::new();
        r.add_entry(Entry { name: intern(name), role: None, volume: None, value: Value::Ranges(range_union(&[], ranges)) });
        r
    }

    fn filter(&self, keep: impl Fn(&Entry) -> bool) -> Resources {
        Resources { entries: self.entries.iter().filter(|e| keep(e)).cloned().collect() }
    }

    /// Whether every resource in `other` is present here (same name, role and kind, at least as much).
    pub fn contains(&self, other: &Resources) -> bool {
        other.entries.iter().all(|o| match self.find(o.key()) {
            Ok(i) => match (&self.entries[i].value, &o.value) {
                (Value::Scalar(a), Value::Scalar(b)) => a >= b,
                (Value::Ranges(a), Value::Ranges(b)) => range_contains(a, b),
                _ => false,
            },
            Err(_) => false,
        })
    }

    /// Adds `other` into `self`.
    pub fn add(&mut self, other: &Resources) {
        for e in &other.entries {
            self.add_entry(e.clone());
        }
    }

    /// Removes `other` from `self`; what `self` lacks is ignored (use [`Resources::contains`] first when that
    /// matters).
    pub fn subtract(&mut self, other: &Resources) {
        for o in &other.entries {
            if let Ok(i) = self.find(o.key()) {
                let value = match (&self.entries[i].value, &o.value) {
                    (Value::Scalar(a), Value::Scalar(b)) => Value::Scalar((a - b).max(0)),
                    (Value::Ranges(a), Value::Ranges(b)) => Value::Ranges(range_difference(a, b)),
                    (v, _) => v.clone(),
                };
                if value.is_empty() {
                    self.entries.remove(i);
                } else {
                    self.entries[i].value = value;
                }
            }
        }
    }

    /// What `self` and `other` have in common: the smaller of each scalar, the overlap of each range list.
    pub fn intersection(&self, other: &Resources) -> Resources {
        let mut out = Resources::new();
        for e in &self.entries {
            if let Ok(i) = other.find(e.key()) {
                let value = match (&e.value, &other.entries[i].value) {
                    (Value::Scalar(a), Value::Scalar(b)) => Value::Scalar(*a.min(b)),
                    (Value::Ranges(a), Value::Ranges(b)) => Value::Ranges(range_difference(a, &range_difference(a, b))),
                    _ => continue,
                };
                out.add_entry(Entry { value, ..e.clone() });
            }
        }
        out
    }

    /// `self + other` as a new value.
    pub fn plus(&self, other: &Resources) -> Resources {
        let mut r = self.clone();
        r.add(other);
        r
    }

    /// `self - other` as a new value.
    pub fn minus(&self, other: &Resources) -> Resources {
        let mut r = self.clone();
        r.subtract(other);
        r
    }

    fn find(&self, key: Key<'_>) -> Result<usize, usize> {
        self.entries.binary_search_by(|e| e.key().cmp(&key))
    }

    fn add_entry(&mut self, entry: Entry) {
        if entry.value.is_empty() {
            return;
        }
        match self.find(entry.key()) {
            Ok(i) => {
                let merged = match (&self.entries[i].value, &entry.value) {
                    (Value::Scalar(a), Value::Scalar(b)) => Value::Scalar(a + b),
                    (Value::Ranges(a), Value::Ranges(b)) => Value::Ranges(range_union(a, b)),
                    (v, _) => v.clone(),
                };
                self.entries[i].value = merged;
            }
            Err(i) => self.entries.insert(i, entry),
        }
    }

    /// Converts from protobuf, validating names, roles and values.
    pub fn from_proto(list: &[v1::Resource]) -> Result<Resources, ParseError> {
        let mut out = Resources::new();
        for r in list {
            let token = format!("{}({})", r.name, if r.role.is_empty() { "*" } else { &r.role });
            validate_name(&token, &r.name)?;
            let role = parse_role(&token, &r.role)?;
            let value = match v1::resource::Type::try_from(r.r#type) {
                Ok(v1::resource::Type::Scalar) => Value::Scalar(scalar_to_milli(&token, r.scalar)?),
                Ok(v1::resource::Type::Ranges) => {
                    let ranges: Vec<(u64, u64)> = r.ranges.iter().map(|x| (x.begin, x.end)).collect();
                    if let Some((b, e)) = ranges.iter().find(|(b, e)| b > e) {
                        return Err(ParseError::new(&token, format!("range {b}-{e} ends before it begins")));
                    }
                    Value::Ranges(range_union(&[], &ranges))
                }
                _ => return Err(ParseError::new(&token, format!("unknown resource type {}", r.r#type))),
            };
            check_kind(&token, &r.name, &value)?;
            let volume = match &r.volume {
                None => None,
                Some(v) => Some(parse_volume(&token, &r.name, role.as_deref(), &v.persistence_id, &v.container_path)?),
            };
            out.add_entry(Entry { name: intern(&r.name), role, volume, value });
        }
        Ok(out)
    }

    /// Converts to protobuf.
    pub fn to_proto(&self) -> Vec<v1::Resource> {
        self.entries
            .iter()
            .map(|e| {
                let mut r = v1::Resource {
                    name: e.name.to_string(),
                    role: e.role.as_deref().unwrap_or_default().to_string(),
                    volume: e.volume.as_ref().map(|v| v1::Volume {
                        persistence_id: v.persistence_id.clone(),
                        container_path: v.container_path.clone(),
                    }),
                    ..Default::default()
                };
                match &e.value {
                    Value::Scalar(v) => {
                        r.set_type(v1::resource::Type::Scalar);
                        r.scalar = *v as f64 / MILLI as f64;
                    }
                    Value::Ranges(ranges) => {
                        r.set_type(v1::resource::Type::Ranges);
                        r.ranges = ranges.iter().map(|&(begin, end)| v1::Range { begin, end }).collect();
                    }
                }
                r
            })
            .collect()
    }

    /// A JSON object summing each resource over roles, the shape Mesos' `/state` uses:
    /// `{"cpus": 4.0, "mem": 4096.0, "ports": "[31000-32000]"}`.
    pub fn to_json_summary(&self) -> serde_json::Value {
        let mut map = serde_json::Map::new();
        for name in ["cpus", "mem", "disk", "gpus"] {
            map.insert(name.into(), serde_json::json!(self.get_scalar(name)));
        }
        for e in &self.entries {
            match &e.value {
                Value::Scalar(_) if !map.contains_key(&*e.name) => {
                    map.insert(e.name.to_string(), serde_json::json!(self.get_scalar(&e.name)));
                }
                Value::Ranges(_) if !map.contains_key(&*e.name) => {
                    map.insert(e.name.to_string(), serde_json::json!(format_ranges(&self.ranges(&e.name))));
                }
                _ => {}
            }
        }
        serde_json::Value::Object(map)
    }
}

impl fmt::Display for Resources {
    /// The operator text form; `parse(to_string())` gives back the same resources.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.entries.iter().enumerate() {
            if i > 0 {
                f.write_str(";")?;
            }
            f.write_str(&describe(e))?;
            match &e.value {
                Value::Scalar(v) => write!(f, ":{}", format_milli(*v))?,
                Value::Ranges(r) => write!(f, ":{}", format_ranges(r))?,
            }
        }
        Ok(())
    }
}

impl std::str::FromStr for Resources {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        Resources::parse(s)
    }
}

fn describe(e: &Entry) -> String {
    let mut out = match &e.role {
        Some(role) => format!("{}({role})", e.name),
        None => e.name.to_string(),
    };
    if let Some(v) = &e.volume {
        out.push_str(&format!("[{}:{}]", v.persistence_id, v.container_path));
    }
    out
}

/// Checks a volume: only on reserved disk, a valid id, and a relative container path that stays in the sandbox.
fn parse_volume(token: &str, name: &str, role: Option<&str>, id: &str, path: &str) -> Result<VolumeSpec, ParseError> {
    if name != "disk" {
        return Err(ParseError::new(token, "only disk resources can be persistent volumes"));
    }
    if role.is_none() {
        return Err(ParseError::new(token, "a persistent volume must be reserved for a role"));
    }
    crate::ids::validate("persistence id", id).map_err(|e| ParseError::new(token, e.to_string()))?;
    validate_container_path(path).map_err(|e| ParseError::new(token, e))?;
    Ok(VolumeSpec { persistence_id: id.to_string(), container_path: path.to_string() })
}

/// A volume's path inside the sandbox: relative, no `..`, no empty parts.
pub fn validate_container_path(path: &str) -> Result<(), String> {
    if path.is_empty() || path.starts_with('/') {
        return Err(format!("container path {path:?} must be relative to the sandbox"));
    }
    if path.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
        return Err(format!("container path {path:?} must not contain '..', '.' or empty parts"));
    }
    if path.chars().any(|c| c.is_control() || c == ':' || c == ']' || c == '[') {
        return Err(format!("container path {path:?} contains a character that is not allowed"));
    }
    Ok(())
}

fn parse_token(token: &str) -> Result<Entry, ParseError> {
    // The value follows the first ':' after any volume suffix `[ID:PATH]` (a '[' before the first ':').
    let volume_suffix = matches!((token.find('['), token.find(':')), (Some(b), Some(c)) if b < c);
    let search_from = if volume_suffix { token.find(']').map(|i| i + 1).unwrap_or(token.len()) } else { 0 };
    let (key, value) = token[search_from..]
        .split_once(':')
        .map(|(k, v)| (&token[..search_from + k.len()], v))
        .ok_or_else(|| ParseError::new(token, "expected NAME:VALUE or NAME(ROLE):VALUE"))?;
    let key = key.trim();
    let value = value.trim();
    let (key, volume) = match key.split_once('[') {
        Some((k, rest)) => {
            let inner = rest.strip_suffix(']').ok_or_else(|| ParseError::new(token, "a volume must end with ']'"))?;
            let (id, path) = inner.split_once(':').ok_or_else(|| ParseError::new(token, "a volume is [ID:PATH]"))?;
            (k.trim(), Some((id.trim().to_string(), path.trim().to_string())))
        }
        None => (key, None),
    };
    let (name, role) = match key.split_once('(') {
        Some((name, rest)) => {
            let role = rest
                .strip_suffix(')')
                .ok_or_else(|| ParseError::new(token, "missing ')' after the role"))?;
            (name.trim(), parse_role(token, role.trim())?)
        }
        None => (key, None),
    };
    validate_name(token, name)?;
    let value = if let Some(inner) = value.strip_prefix('[') {
        let inner = inner
            .strip_suffix(']')
            .ok_or_else(|| ParseError::new(token, "a range list must end with ']'"))?;
        Value::Ranges(parse_ranges(token, inner)?)
    } else {
        let v: f64 = value
            .parse()
            .map_err(|_| ParseError::new(token, format!("value {value:?} is not a number")))?;
        Value::Scalar(scalar_to_milli(token, v)?)
    };
    check_kind(token, name, &value)?;
    let volume = match volume {
        Some((id, path)) => Some(parse_volume(token, name, role.as_deref(), &id, &path)?),
        None => None,
    };
    Ok(Entry { name: intern(name), role, volume, value })
}

fn parse_ranges(token: &str, inner: &str) -> Result<Vec<(u64, u64)>, ParseError> {
    let mut ranges = Vec::new();
    for part in inner.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (b, e) = part.split_once('-').unwrap_or((part, part));
        let parse = |s: &str| {
            s.trim()
                .parse::<u64>()
                .map_err(|_| ParseError::new(token, format!("range bound {:?} is not a whole number", s.trim())))
        };
        let (b, e) = (parse(b)?, parse(e)?);
        if b > e {
            return Err(ParseError::new(token, format!("range {b}-{e} ends before it begins")));
        }
        ranges.push((b, e));
    }
    Ok(range_union(&[], &ranges))
}

fn validate_name(token: &str, name: &str) -> Result<(), ParseError> {
    if name.is_empty() {
        return Err(ParseError::new(token, "resource name is empty"));
    }
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.') {
        return Err(ParseError::new(token, format!("resource name {name:?} has characters other than [A-Za-z0-9_.-]")));
    }
    Ok(())
}

/// Roles: `*` or empty is unreserved; otherwise a name without `/`, whitespace or parentheses.
fn parse_role(token: &str, role: &str) -> Result<Option<Arc<str>>, ParseError> {
    if role.is_empty() || role == "*" {
        return Ok(None);
    }
    validate_role(role).map_err(|reason| ParseError::new(token, reason))?;
    Ok(Some(role.into()))
}

/// Checks a role name (shared by resource parsing, framework subscription and the master's `--weights`).
pub fn validate_role(role: &str) -> Result<(), String> {
    if role.is_empty() {
        return Err("role name is empty".into());
    }
    if role == "." || role == ".." || role.starts_with('-') || role.len() > 255 {
        return Err(format!("role {role:?} is not a valid role name"));
    }
    if let Some(c) = role.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))) {
        return Err(format!("role {role:?} contains {c:?}; allowed are letters, digits, '.', '_' and '-'"));
    }
    Ok(())
}

fn check_kind(token: &str, name: &str, value: &Value) -> Result<(), ParseError> {
    match value {
        Value::Ranges(_) if SCALAR_NAMES.contains(&name) => {
            Err(ParseError::new(token, format!("{name} is a scalar, not a range list")))
        }
        Value::Scalar(_) if RANGE_NAMES.contains(&name) => {
            Err(ParseError::new(token, format!("{name} is a range list like [31000-32000], not a number")))
        }
        _ => Ok(()),
    }
}

fn scalar_to_milli(token: &str, v: f64) -> Result<i64, ParseError> {
    if !v.is_finite() {
        return Err(ParseError::new(token, "value is not a finite number"));
    }
    if v < 0.0 {
        return Err(ParseError::new(token, format!("value {v} is negative")));
    }
    if v > 1e15 {
        return Err(ParseError::new(token, format!("value {v} is too large")));
    }
    Ok(to_milli(v))
}

fn to_milli(v: f64) -> i64 {
    (v * MILLI as f64).round() as i64
}

fn format_milli(v: i64) -> String {
    if v % MILLI == 0 {
        return (v / MILLI).to_string();
    }
    let s = format!("{}.{:03}", v / MILLI, v % MILLI);
    s.trim_end_matches('0').to_string()
}

/// Formats ranges as `[31000-32000,33000-33000]`.
pub fn format_ranges(ranges: &[(u64, u64)]) -> String {
    let parts: Vec<String> = ranges.iter().map(|(b, e)| format!("{b}-{e}")).collect();
    format!("[{}]", parts.join(","))
}

/// Union of two normalised range lists (also normalises an unsorted `b` when `a` is empty).
fn range_union(a: &[(u64, u64)], b: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut all: Vec<(u64, u64)> = a.iter().chain(b.iter()).copied().collect();
    all.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(all.len());
    for (b, e) in all {
        match out.last_mut() {
            Some(last) if b <= last.1.saturating_add(1) => last.1 = last.1.max(e),
            _ => out.push((b, e)),
        }
    }
    out
}

fn range_difference(a: &[(u64, u64)], b: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for &(mut lo, hi) in a {
        let mut alive = true;
        for &(rb, re) in b {
            if !alive || re < lo || rb > hi {
                continue;
            }
            if rb > lo {
                out.push((lo, rb - 1));
            }
            if re >= hi {
                alive = false;
            } else {
                lo = re + 1;
            }
        }
        if alive {
            out.push((lo, hi));
        }
    }
    out
}

fn range_contains(a: &[(u64, u64)], b: &[(u64, u64)]) -> bool {
    b.iter().all(|&(bb, be)| a.iter().any(|&(ab, ae)| ab <= bb && be <= ae))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_the_operator_form() {
        let r = Resources::parse("cpus:4;mem:4096;disk:20000;ports:[31000-32000]").unwrap();
        assert_eq!(r.get_scalar("cpus"), 4.0);
        assert_eq!(r.get_scalar("mem"), 4096.0);
        assert_eq!(r.get_scalar("disk"), 20000.0);
        assert_eq!(r.ranges("ports"), vec![(31000, 32000)]);
        assert_eq!(r.to_string(), "cpus:4;disk:20000;mem:4096;ports:[31000-32000]");
    }

    #[test]
    fn capped_keeps_reserved_first_and_volumes_whole() {
        let r = Resources::parse("cpus:4;mem:1024;cpus(db):1;ports:[1-2]").unwrap();
        assert_eq!(r.capped("cpus", 2_500), Resources::parse("cpus:1.5;cpus(db):1;mem:1024;ports:[1-2]").unwrap());
        assert_eq!(r.capped("cpus", 0), Resources::parse("mem:1024;ports:[1-2]").unwrap());
        assert_eq!(r.capped("mem", i64::MAX), r);
        let v = Resources::volume("db", "v1", "data", 100.0).plus(&Resources::parse("disk:50").unwrap());
        assert_eq!(v.capped("disk", 60_000), Resources::parse("disk:50").unwrap());
        assert_eq!(v.capped("disk", 120_000), Resources::volume("db", "v1", "data", 100.0).plus(&Resources::parse("disk:20").unwrap()));
    }

    #[test]
    fn parses_reservations() {
        let r = Resources::parse("cpus:4;cpus(analytics):2;mem(analytics):1024;mem:512").unwrap();
        assert_eq!(r.get_scalar("cpus"), 6.0);
        assert_eq!(r.reserved_for("analytics").get_scalar("cpus"), 2.0);
        assert_eq!(r.unreserved().get_scalar("mem"), 512.0);
        assert_eq!(r.allocatable_to("analytics").get_scalar("mem"), 1536.0);
        assert_eq!(r.allocatable_to("other").get_scalar("mem"), 512.0);
        assert_eq!(r.reservation_roles(), vec!["analytics"]);
        assert_eq!(r.flatten().to_string(), "cpus:6;mem:1536");
        assert_eq!(Resources::parse("cpus(*):1").unwrap(), Resources::parse("cpus:1").unwrap());
    }

    #[test]
    fn errors_name_the_offending_token() {
        let cases = [
            ("cpus:4;mem:lots", "mem:lots", "not a number"),
            ("cpus:-1", "cpus:-1", "negative"),
            ("cpus", "cpus", "NAME:VALUE"),
            ("cpus:1;cpus:2", "cpus:2", "more than once"),
            ("ports:[5-1]", "ports:[5-1]", "ends before"),
            ("ports:[1-x]", "ports:[1-x]", "whole number"),
            ("ports:5", "ports:5", "range list"),
            ("cpus:[1-2]", "cpus:[1-2]", "scalar"),
            ("cpus(a/b):1", "cpus(a/b):1", "'/'"),
            ("cpus(a:1", "cpus(a:1", "')'"),
            ("c pu:1", "c pu:1", "characters"),
            ("mem:inf", "mem:inf", "finite"),
            ("ports:[1-2", "ports:[1-2", "']'"),
        ];
        for (input, token, reason) in cases {
            let err = Resources::parse(input).unwrap_err();
            assert_eq!(err.token, token, "{input}");
            assert!(err.to_string().contains(reason), "{input}: {err}");
        }
    }

    #[test]
    fn range_arithmetic() {
        let mut r = Resources::parse("ports:[1-10,20-30]").unwrap();
        r.subtract(&Resources::parse("ports:[5-6,20-30]").unwrap());
        assert_eq!(r.ranges("ports"), vec![(1, 4), (7, 10)]);
        assert!(r.contains(&Resources::parse("ports:[7-8]").unwrap()));
        assert!(!r.contains(&Resources::parse("ports:[4-7]").unwrap()));
        r.add(&Resources::parse("ports:[5-6]").unwrap());
        assert_eq!(r.ranges("ports"), vec![(1, 10)]);
    }

    #[test]
    fn fractional_cpus_do_not_drift() {
        let mut r = Resources::parse("cpus:1").unwrap();
        let tenth = Resources::parse("cpus:0.1").unwrap();
        for _ in 0..10 {
            assert!(r.contains(&tenth));
            r.subtract(&tenth);
        }
        assert!(r.is_empty());
        assert_eq!(Resources::parse("cpus:0.25").unwrap().to_string(), "cpus:0.25");
    }

    #[test]
    fn reserved_and_unreserved_do_not_mix() {
        let r = Resources::parse("cpus(a):2").unwrap();
        assert!(!r.contains(&Resources::parse("cpus:1").unwrap()));
        assert!(!Resources::parse("cpus:2").unwrap().contains(&Resources::parse("cpus(a):1").unwrap()));
    }

    #[test]
    fn proto_round_trip_and_validation() {
        let r = Resources::parse("cpus:1.5;mem(x):64;ports:[1-3,7-9]").unwrap();
        assert_eq!(Resources::from_proto(&r.to_proto()).unwrap(), r);
        let bad = v1::Resource {
            name: "cpus".into(),
            r#type: v1::resource::Type::Scalar as i32,
            scalar: f64::NAN,
            ..Default::default()
        };
        assert!(Resources::from_proto(&[bad]).unwrap_err().to_string().contains("finite"));
        let untyped = v1::Resource { name: "cpus".into(), ..Default::default() };
        assert!(Resources::from_proto(&[untyped]).unwrap_err().to_string().contains("type"));
    }

    #[test]
    fn volumes_are_reserved_disk_with_their_own_identity() {
        let v = Resources::volume("store", "db1", "data", 64.0);
        assert_eq!(v.to_string(), "disk(store)[db1:data]:64");
        assert_eq!(Resources::parse("disk(store)[db1:data]:64").unwrap(), v);
        assert_eq!(Resources::from_proto(&v.to_proto()).unwrap(), v);
        let plain = Resources::parse("disk(store):64").unwrap();
        assert!(!plain.contains(&v) && !v.contains(&plain), "a volume is not interchangeable with plain disk");
        assert_eq!(v.without_volumes(), plain);
        assert_eq!(v.volumes(), vec![("store".to_string(), VolumeSpec { persistence_id: "db1".into(), container_path: "data".into() }, 64.0)]);
        assert_eq!(v.get_scalar("disk"), 64.0);
        for (bad, why) in [
            ("disk[db1:data]:64", "reserved"),
            ("mem(store)[db1:data]:64", "only disk"),
            ("disk(store)[db1:../etc]:64", ".."),
            ("disk(store)[db1:/abs]:64", "relative"),
            ("disk(store)[d b:data]:64", "persistence id"),
            ("disk(store)[db1]:64", "[ID:PATH]"),
        ] {
            let err = Resources::parse(bad).unwrap_err().to_string();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn json_summary_sums_roles() {
        let r = Resources::parse("cpus:1;cpus(a):1;ports:[1-2]").unwrap();
        let j = r.to_json_summary();
        assert_eq!(j["cpus"], 2.0);
        assert_eq!(j["mem"], 0.0);
        assert_eq!(j["ports"], "[1-2]");
    }

    fn arb_resources() -> impl Strategy<Value = Resources> {
        let scalar = (prop_oneof!["cpus", "mem", "disk"], prop::option::of("[ab]"), 0u32..100_000).prop_map(
            |(name, role, milli)| Entry { name: intern(&name), role: role.map(Arc::from), volume: None, value: Value::Scalar(milli as i64) },
        );
        let ports = (prop::option::of("[ab]"), prop::collection::vec((0u64..200, 0u64..20), 1..4)).prop_map(
            |(role, spans)| {
                let ranges: Vec<(u64, u64)> = spans.into_iter().map(|(b, len)| (b, b + len)).collect();
                let role = role.map(Arc::from);
                Entry { name: intern("ports"), role, volume: None, value: Value::Ranges(range_union(&[], &ranges)) }
            },
        );
        prop::collection::vec(prop_oneof![scalar, ports], 0..6).prop_map(|entries| {
            let mut r = Resources::new();
            for e in entries {
                r.add_entry(e);
            }
            r
        })
    }

    proptest! {
        #[test]
        fn text_form_round_trips(r in arb_resources()) {
            prop_assert_eq!(Resources::parse(&r.to_string()).unwrap(), r);
        }

        #[test]
        fn add_then_subtract_is_identity(a in arb_resources(), b in arb_resources()) {
            let sum = a.plus(&b);
            prop_assert!(sum.contains(&a));
            prop_assert!(sum.contains(&b));
            // Ranges are sets (ports overlap rather than stack), so the exact identity holds for scalars only;
            // for everything, taking b away and putting it back gives the sum, and never more than a is left.
            let rest = sum.minus(&b);
            prop_assert!(a.contains(&rest));
            prop_assert_eq!(rest.plus(&b), sum.clone());
            for name in ["cpus", "mem", "disk"] {
                prop_assert_eq!(rest.scalar_milli(name), a.scalar_milli(name));
            }
        }

        #[test]
        fn subtract_then_add_restores_contained(a in arb_resources(), b in arb_resources()) {
            let whole = a.plus(&b);
            let part = whole.minus(&a);
            prop_assert!(whole.contains(&part));
            prop_assert_eq!(part.plus(&a), whole);
        }

        #[test]
        fn contains_is_reflexive_and_empty_is_contained(a in arb_resources()) {
            prop_assert!(a.contains(&a));
            prop_assert!(a.contains(&Resources::new()));
            prop_assert!(a.minus(&a).is_empty());
        }

        #[test]
        fn intersection_is_contained_in_both(a in arb_resources(), b in arb_resources()) {
            let i = a.intersection(&b);
            prop_assert!(a.contains(&i));
            prop_assert!(b.contains(&i));
            prop_assert_eq!(a.intersection(&a), a.clone());
            prop_assert_eq!(i, b.intersection(&a));
        }

        #[test]
        fn flatten_keeps_totals(a in arb_resources()) {
            let f = a.flatten();
            for name in ["cpus", "mem", "disk"] {
                prop_assert_eq!(f.scalar_milli(name), a.scalar_milli(name));
            }
            prop_assert_eq!(f.ranges("ports"), a.ranges("ports"));
            prop_assert!(f.reservation_roles().is_empty());
        }

        #[test]
        fn reserved_plus_unreserved_is_the_whole(a in arb_resources()) {
            let mut parts = a.unreserved();
            for role in a.reservation_roles() {
                parts.add(&a.reserved_for(role));
            }
            prop_assert_eq!(parts, a);
        }

        #[test]
        fn parse_never_panics(s in ".{0,40}") {
            let _ = Resources::parse(&s);
        }
    }
}
