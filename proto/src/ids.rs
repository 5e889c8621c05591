//! Identifier newtypes. Ids become directory names on agents (sandboxes) and keys in the registry, so they are
//! validated once here: non-empty, at most 255 bytes, and only `[A-Za-z0-9._-]` (no `/`, no `..`, no whitespace).

use std::fmt;
use std::sync::Arc;

/// Why an id was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{kind} must not be empty")]
    Empty { kind: &'static str },
    #[error("{kind} {value:?} is longer than 255 bytes")]
    TooLong { kind: &'static str, value: String },
    #[error("{kind} {value:?} contains {bad:?}; allowed are letters, digits, '.', '_' and '-'")]
    BadChar { kind: &'static str, value: String, bad: char },
    #[error("{kind} {value:?} may not be '.' or '..'")]
    Dots { kind: &'static str, value: String },
}

/// Checks that `value` is a valid id of the given kind (used in error messages).
pub fn validate(kind: &'static str, value: &str) -> Result<(), IdError> {
    if value.is_empty() {
        return Err(IdError::Empty { kind });
    }
    if value.len() > 255 {
        return Err(IdError::TooLong { kind, value: value.chars().take(64).collect::<String>() + "…" });
    }
    if value == "." || value == ".." {
        return Err(IdError::Dots { kind, value: value.to_string() });
    }
    if let Some(bad) = value.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
        return Err(IdError::BadChar { kind, value: value.to_string(), bad });
    }
    Ok(())
}

/// Ids are shared (`Arc<str>`): the master keeps each in several indexes and clones them into every message, so a
/// clone is a reference count, not a copy.
macro_rules! id_type {
    ($name:ident, $kind:literal) => {
        #[doc = concat!("A validated ", $kind, ".")]
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(Arc<str>);

        impl $name {
            /// Validates and wraps `value`.
            pub fn new(value: impl Into<String>) -> Result<Self, IdError> {
                let value = value.into();
                validate($kind, &value)?;
                Ok(Self(value.into()))
            }
            /// A fresh random id with the given prefix.
            pub fn generate(prefix: &str) -> Self {
                Self(format!("{prefix}{}", uuid::Uuid::new_v4().simple()).into())
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(value: String) -> Result<Self, IdError> {
                Self::new(value)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0.to_string()
            }
        }

        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }
    };
}

id_type!(AgentId, "agent id");
id_type!(FrameworkId, "framework id");
id_type!(TaskId, "task id");
id_type!(OfferId, "offer id");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_ids() {
        for ok in ["a", "web-1", "my_app.instance-3", "0123"] {
            assert!(TaskId::new(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn refuses_ids_that_could_escape_a_directory() {
        assert_eq!(TaskId::new(""), Err(IdError::Empty { kind: "task id" }));
        assert!(matches!(TaskId::new(".."), Err(IdError::Dots { .. })));
        assert!(matches!(TaskId::new("a/b"), Err(IdError::BadChar { bad: '/', .. })));
        assert!(matches!(TaskId::new("a b"), Err(IdError::BadChar { bad: ' ', .. })));
        assert!(matches!(TaskId::new("x".repeat(256)), Err(IdError::TooLong { .. })));
        let msg = TaskId::new("bad id").unwrap_err().to_string();
        assert!(msg.contains("task id") && msg.contains("bad id"), "{msg}");
    }

    #[test]
    fn generated_ids_are_valid_and_distinct() {
        let a = AgentId::generate("agent-");
        let b = AgentId::generate("agent-");
        assert_ne!(a, b);
        assert!(AgentId::new(a.as_str()).is_ok());
    }
}
