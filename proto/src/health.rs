//! Validation of task health checks, shared by the master (which refuses bad ones at launch) and tools.

use crate::v1::{HealthCheck, health_check::Type};

/// Checks a task's health check for mistakes a framework can make; the message names the field.
pub fn validate(hc: &HealthCheck) -> Result<(), String> {
    for (name, v) in [
        ("delay_seconds", hc.delay_seconds),
        ("interval_seconds", hc.interval_seconds),
        ("timeout_seconds", hc.timeout_seconds),
        ("grace_period_seconds", hc.grace_period_seconds),
    ] {
        if !(v.is_finite() && (0.0..=86_400.0).contains(&v)) {
            return Err(format!("health_check.{name} must be between 0 and 86400, got {v}"));
        }
    }
    match Type::try_from(hc.r#type) {
        Ok(Type::Command) if hc.command.trim().is_empty() => Err("health_check.command is empty".into()),
        Ok(Type::Command) | Ok(Type::Tcp) => Ok(()),
        Ok(Type::Http) if !hc.path.is_empty() && !hc.path.starts_with('/') => {
            Err(format!("health_check.path {:?} must start with '/'", hc.path))
        }
        Ok(Type::Http) => Ok(()),
        _ => Err(format!("health_check.type {} is not COMMAND, HTTP or TCP", hc.r#type)),
    }
    .and_then(|_| if hc.port > u16::MAX as u32 { Err(format!("health_check.port {} is not a port", hc.port)) } else { Ok(()) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_the_field() {
        let cmd = |c: &str| HealthCheck { r#type: Type::Command as i32, command: c.into(), ..Default::default() };
        assert!(validate(&cmd("true")).is_ok());
        assert!(validate(&cmd(" ")).unwrap_err().contains("command"));
        assert!(validate(&HealthCheck::default()).unwrap_err().contains("type"));
        let mut bad = cmd("true");
        bad.interval_seconds = f64::NAN;
        assert!(validate(&bad).unwrap_err().contains("interval_seconds"));
        let http = HealthCheck { r#type: Type::Http as i32, path: "health".into(), ..Default::default() };
        assert!(validate(&http).unwrap_err().contains("'/'"));
        let tcp = HealthCheck { r#type: Type::Tcp as i32, port: 70000, ..Default::default() };
        assert!(validate(&tcp).unwrap_err().contains("70000"));
    }
}
