//! What this node offers: detected cpus, memory and disk, overridden by the operator's `--resources`, plus
//! `--attributes`.

use std::path::Path;

use corral_proto::{Resources, v1};

/// Default port range offered when `--resources` names none (as Mesos does).
const DEFAULT_PORTS: &str = "ports:[31000-32000]";

/// Detected resources: every cpu, memory less what the system needs (1 GiB, or half on small hosts), and the
/// work dir's file system less 5 GiB (or half).
pub fn detect(work_dir: &Path) -> Resources {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let mem_mib = meminfo_total_kib().map(|kib| kib / 1024).unwrap_or(1024);
    let mem = mem_mib.saturating_sub((mem_mib / 2).min(1024));
    let disk_mib = nix::sys::statvfs::statvfs(work_dir)
        .map(|s| s.blocks() * s.fragment_size() / (1024 * 1024))
        .unwrap_or(0);
    let disk = disk_mib.saturating_sub((disk_mib / 2).min(5 * 1024));
    Resources::parse(&format!("cpus:{cpus};mem:{mem};disk:{disk};{DEFAULT_PORTS}")).expect("well-formed")
}

fn meminfo_total_kib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The agent's resources: `--resources` where given; detected values for every resource it leaves out.
pub fn resources(flag: Option<&str>, work_dir: &Path) -> Result<Resources, corral_proto::ParseError> {
    let given = Resources::parse(flag.unwrap_or(""))?;
    let detected = detect(work_dir);
    let mut out = given.clone();
    for name in ["cpus", "mem", "disk"] {
        if given.get_scalar(name) == 0.0 {
            out.add(&Resources::scalar(name, detected.get_scalar(name)));
        }
    }
    if given.ranges("ports").is_empty() {
        out.add(&Resources::parse(DEFAULT_PORTS).expect("well-formed"));
    }
    Ok(out)
}

/// Parses `--attributes "rack:r1;zone:a"`.
pub fn attributes(text: &str) -> Result<Vec<v1::Attribute>, String> {
    let mut out: Vec<v1::Attribute> = Vec::new();
    for token in text.split(';').map(str::trim).filter(|t| !t.is_empty()) {
        let (name, value) = token
            .split_once(':')
            .ok_or_else(|| format!("invalid attribute {token:?}: expected NAME:VALUE"))?;
        let (name, value) = (name.trim(), value.trim());
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c)) {
            return Err(format!("invalid attribute {token:?}: name must be [A-Za-z0-9_.-]+"));
        }
        if value.is_empty() {
            return Err(format!("invalid attribute {token:?}: value is empty"));
        }
        if out.iter().any(|a| a.name == name) {
            return Err(format!("invalid attribute {token:?}: {name} is given more than once"));
        }
        out.push(v1::Attribute { name: name.to_string(), value: value.to_string() });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detection_finds_this_host() {
        let r = detect(Path::new("/"));
        assert!(r.get_scalar("cpus") >= 1.0);
        assert!(r.get_scalar("mem") > 0.0);
        assert_eq!(r.ranges("ports"), vec![(31000, 32000)]);
    }

    #[test]
    fn flag_overrides_detection_per_resource() {
        let r = resources(Some("cpus:2;ports:[5000-5001]"), Path::new("/")).unwrap();
        assert_eq!(r.get_scalar("cpus"), 2.0);
        assert!(r.get_scalar("mem") > 0.0, "mem still detected");
        assert_eq!(r.ranges("ports"), vec![(5000, 5001)]);
        assert!(resources(Some("cpus:x"), Path::new("/")).unwrap_err().to_string().contains("cpus:x"));
    }

    #[test]
    fn attributes_parse_and_errors_name_the_token() {
        let a = attributes("rack:r1; zone:a").unwrap();
        assert_eq!((a[0].name.as_str(), a[0].value.as_str()), ("rack", "r1"));
        assert_eq!(a.len(), 2);
        assert!(attributes("rack").unwrap_err().contains("\"rack\""));
        assert!(attributes("rack:").unwrap_err().contains("empty"));
        assert!(attributes("a:1;a:2").unwrap_err().contains("more than once"));
        assert!(attributes("r k:1").is_err());
    }
}
