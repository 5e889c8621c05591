//! The optional configuration file of `corral-master` and `corral-agent` (`--config FILE` or `CORRAL_CONFIG`).
//!
//! A TOML file whose keys are the binary's long flag names (`work-dir` or `work_dir`). Its values become
//! command-line flags placed *before* the real ones, and are skipped where the same setting is given as a flag or
//! as a `CORRAL_*` environment variable — so the order of precedence is flag, then environment, then file. There
//! is still one clap definition per binary; this only feeds it.

use std::ffi::OsString;

/// Inserts the settings of the config file named in `argv` (or `CORRAL_CONFIG`) as flags. `known` lists the
/// binary's long flag names; `env` looks up environment variables.
pub fn expand(argv: Vec<OsString>, known: &[String], env: impl Fn(&str) -> Option<String>) -> Result<Vec<OsString>, String> {
    let args: Vec<String> = argv.iter().map(|a| a.to_string_lossy().into_owned()).collect();
    let path = args
        .iter()
        .enumerate()
        .find_map(|(i, a)| match a.strip_prefix("--config") {
            Some("") => args.get(i + 1).cloned(),
            Some(v) if v.starts_with('=') => Some(v[1..].to_string()),
            _ => None,
        })
        .or_else(|| env("CORRAL_CONFIG"));
    let Some(path) = path else { return Ok(argv) };
    let text = std::fs::read_to_string(&path).map_err(|e| format!("cannot read config file {path}: {e}"))?;
    let table: toml::Table = text.parse().map_err(|e| format!("config file {path} is not valid TOML: {e}"))?;
    let mut injected = Vec::new();
    for (key, value) in table {
        let flag = key.replace('_', "-");
        if !known.contains(&flag) || flag == "config" {
            return Err(format!("config file {path}: unknown setting {key:?}; known: {}", known.join(", ")));
        }
        let on_command_line = args.iter().any(|a| *a == format!("--{flag}") || a.starts_with(&format!("--{flag}=")));
        let in_env = env(&format!("CORRAL_{}", flag.replace('-', "_").to_uppercase())).is_some();
        if on_command_line || in_env {
            continue;
        }
        match value {
            toml::Value::Boolean(true) => injected.push(format!("--{flag}")),
            toml::Value::Boolean(false) => {}
            toml::Value::String(s) => injected.push(format!("--{flag}={s}")),
            toml::Value::Integer(n) => injected.push(format!("--{flag}={n}")),
            toml::Value::Float(x) => injected.push(format!("--{flag}={x}")),
            other => return Err(format!("config file {path}: setting {key:?} must be a string, number or boolean, not {}", other.type_str())),
        }
    }
    let mut out = argv;
    let at = 1.min(out.len());
    out.splice(at..at, injected.into_iter().map(OsString::from));
    Ok(out)
}

/// [`expand`] for this process's arguments and environment; prints the error and exits with status 2 (a usage
/// error, like clap's) when the file is unreadable or wrong.
pub fn expand_process_args(known: &[String]) -> Vec<OsString> {
    expand(std::env::args_os().collect(), known, |k| std::env::var(k).ok()).unwrap_or_else(|e| {
        eprintln!("error: {e}");
        std::process::exit(2)
    })
}

/// The host name other components reach a daemon at when none is configured: the listen IP, or this host's name
/// when the daemon listens on all addresses.
pub fn default_advertised_host(ip: std::net::IpAddr) -> String {
    if !ip.is_unspecified() {
        return ip.to_string();
    }
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_default_advertised_host_is_the_listen_ip_or_the_host_name() {
        assert_eq!(default_advertised_host("10.1.2.3".parse().unwrap()), "10.1.2.3");
        let name = default_advertised_host("0.0.0.0".parse().unwrap());
        assert!(!name.is_empty() && name != "0.0.0.0", "{name}");
    }

    use super::*;

    fn known() -> Vec<String> {
        ["config", "port", "work-dir", "weights", "cgroups-enable-cfs", "ip"].iter().map(|s| s.to_string()).collect()
    }

    fn args(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn file_settings_become_flags_that_env_and_flags_override() {
        let dir = std::env::temp_dir().join(format!("corral-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("master.toml");
        std::fs::write(&file, "port = 6060\nwork_dir = \"/var/lib/x\"\nweights = \"a=3\"\ncgroups-enable-cfs = true\nip = \"10.0.0.1\"\n").unwrap();
        let config = format!("--config={}", file.display());
        let env = |k: &str| (k == "CORRAL_IP").then(|| "127.0.0.1".to_string());
        let out = expand(args(&["corral-master", &config, "--port", "7070"]), &known(), env).unwrap();
        let out: Vec<String> = out.into_iter().map(|a| a.into_string().unwrap()).collect();
        assert_eq!(out[0], "corral-master");
        assert!(out.contains(&"--work-dir=/var/lib/x".to_string()) && out.contains(&"--weights=a=3".to_string()));
        assert!(out.contains(&"--cgroups-enable-cfs".to_string()));
        assert!(!out.iter().any(|a| a == "--port=6060"), "the command line wins: {out:?}");
        assert!(!out.iter().any(|a| a.starts_with("--ip")), "the environment wins: {out:?}");

        std::fs::write(&file, "prot = 1\n").unwrap();
        let err = expand(args(&["m", &config]), &known(), |_| None).unwrap_err();
        assert!(err.contains("\"prot\"") && err.contains("unknown"), "{err}");
        std::fs::write(&file, "port = [1]\n").unwrap();
        assert!(expand(args(&["m", &config]), &known(), |_| None).unwrap_err().contains("\"port\""));
        std::fs::write(&file, "port = \n").unwrap();
        assert!(expand(args(&["m", &config]), &known(), |_| None).unwrap_err().contains("not valid TOML"));
        let missing = expand(args(&["m", "--config", "/nonexistent.toml"]), &known(), |_| None).unwrap_err();
        assert!(missing.contains("/nonexistent.toml"), "{missing}");
        assert_eq!(expand(args(&["m", "--port=1"]), &known(), |_| None).unwrap(), args(&["m", "--port=1"]));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
