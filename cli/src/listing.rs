//! `corral node list`, `framework list`, `task list`, `task log`: views of the master's `/state`, and task logs
//! read from the agent's sandbox through its `/files/read`.

use std::time::Duration;

use anyhow::{Context, anyhow};
use serde_json::{Value, json};

use crate::client::{Masters, NotFound, get_json};
use crate::table;

pub(crate) fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

pub(crate) fn num(v: &Value) -> String {
    let n = v.as_f64().unwrap_or(0.0);
    if n.fract() == 0.0 { format!("{n:.0}") } else { format!("{n:.2}") }
}

pub(crate) fn array<'a>(v: &'a Value, key: &str) -> impl Iterator<Item = &'a Value> {
    v.get(key).and_then(Value::as_array).into_iter().flatten()
}

pub async fn nodes(masters: &Masters, json_out: bool) -> anyhow::Result<i32> {
    let state = masters.state().await?;
    let agents: Vec<&Value> = array(&state, "agents").collect();
    if json_out {
        println!("{}", serde_json::to_string_pretty(&agents)?);
        return Ok(0);
    }
    let rows: Vec<Vec<String>> = agents
        .iter()
        .map(|a| {
            let (r, u) = (&a["resources"], &a["used_resources"]);
            vec![
                s(&a["hostname"]),
                s(&a["id"]),
                s(&a["state"]),
                format!("{}/{}", num(&u["cpus"]), num(&r["cpus"])),
                format!("{}/{}", num(&u["mem"]), num(&r["mem"])),
                s(&a["task_count"]),
            ]
        })
        .collect();
    table::print(&["HOSTNAME", "ID", "STATE", "CPUS", "MEM", "TASKS"], &rows);
    Ok(0)
}

pub async fn frameworks(masters: &Masters, all: bool, json_out: bool) -> anyhow::Result<i32> {
    let state = masters.state().await?;
    let mut list: Vec<Value> = array(&state, "frameworks").cloned().collect();
    if all {
        list.extend(array(&state, "completed_frameworks").cloned());
    }
    if json_out {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(0);
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|f| {
            let roles: Vec<String> = array(f, "roles").map(s).collect();
            let state = if f["connected"].as_bool() == Some(true) {
                "ACTIVE"
            } else if state["frameworks"].as_array().is_some_and(|a| a.iter().any(|x| x["id"] == f["id"])) {
                "DISCONNECTED"
            } else {
                "COMPLETED"
            };
            vec![
                s(&f["name"]),
                s(&f["id"]),
                roles.join(","),
                state.to_string(),
                (array(f, "tasks").count() + array(f, "completed_tasks").count()).to_string(),
                num(&f["used_resources"]["cpus"]),
                num(&f["used_resources"]["mem"]),
            ]
        })
        .collect();
    table::print(&["NAME", "ID", "ROLES", "STATE", "TASKS", "CPUS", "MEM"], &rows);
    Ok(0)
}

/// Every task the master knows, active first, with the framework id filled in.
pub(crate) fn all_tasks(state: &Value, include_completed: bool) -> Vec<Value> {
    let mut out = Vec::new();
    let frameworks = array(state, "frameworks").chain(array(state, "completed_frameworks").filter(|_| include_completed));
    for f in frameworks {
        out.extend(array(f, "tasks").cloned());
        if include_completed {
            out.extend(array(f, "completed_tasks").cloned());
        }
    }
    out
}

pub async fn tasks(masters: &Masters, all: bool, json_out: bool) -> anyhow::Result<i32> {
    let state = masters.state().await?;
    let tasks = all_tasks(&state, all);
    if json_out {
        println!("{}", serde_json::to_string_pretty(&tasks)?);
        return Ok(0);
    }
    let hosts: std::collections::HashMap<String, String> =
        array(&state, "agents").map(|a| (s(&a["id"]), s(&a["hostname"]))).collect();
    let rows: Vec<Vec<String>> = tasks
        .iter()
        .map(|t| {
            vec![
                s(&t["name"]),
                s(&t["id"]),
                s(&t["state"]),
                hosts.get(&s(&t["agent_id"])).cloned().unwrap_or_else(|| s(&t["agent_id"])),
                num(&t["resources"]["cpus"]),
                num(&t["resources"]["mem"]),
                s(&t["framework_id"]),
            ]
        })
        .collect();
    table::print(&["NAME", "ID", "STATE", "HOST", "CPUS", "MEM", "FRAMEWORK"], &rows);
    Ok(0)
}

#[derive(Debug, clap::Args)]
pub struct LogArgs {
    /// Task id (or a unique part of it).
    task: String,
    /// Read stderr instead of stdout.
    #[arg(long)]
    stderr: bool,
    /// Keep printing new output until the task ends.
    #[arg(long)]
    follow: bool,
    /// Only the last N lines.
    #[arg(long)]
    lines: Option<usize>,
}

/// Finds exactly one task by id or unique substring (an exact id always wins).
pub(crate) fn find_task(tasks: &[Value], wanted: &str) -> anyhow::Result<Value> {
    find_one(tasks, wanted, |t| s(&t["id"]).contains(wanted), "task", "corral task list --all")
}

/// Finds exactly one of `items` (JSON objects with an `id`) the user named: an exact id wins, else the one id among
/// those `matches` picks (the last item of it: a task id reused after completion means the latest run). `kind` and
/// `list` (the command that lists them) word the errors.
pub(crate) fn find_one(items: &[Value], wanted: &str, matches: impl Fn(&Value) -> bool, kind: &str, list: &str) -> anyhow::Result<Value> {
    if let Some(exact) = items.iter().rev().find(|x| x["id"] == json!(wanted)) {
        return Ok(exact.clone());
    }
    let found: Vec<&Value> = items.iter().filter(|x| matches(x)).collect();
    let mut ids: Vec<String> = Vec::new();
    for id in found.iter().map(|x| s(&x["id"])) {
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
    match (ids.len(), found.last()) {
        (1, Some(last)) => Ok((*last).clone()),
        (0, _) | (_, None) => Err(NotFound(format!("no {kind} matches {wanted:?}; see `{list}`")).into()),
        _ => Err(anyhow!("{wanted:?} matches several {kind}s: {}", ids.join(", "))),
    }
}

pub async fn log(masters: &Masters, args: LogArgs) -> anyhow::Result<i32> {
    let state = masters.state().await?;
    let task = find_task(&all_tasks(&state, true), &args.task)?;
    let (task_id, framework_id, agent_id) = (s(&task["id"]), s(&task["framework_id"]), s(&task["agent_id"]));
    let agent = array(&state, "agents")
        .find(|a| s(&a["id"]) == agent_id)
        .ok_or_else(|| anyhow!("agent {agent_id} of task {task_id} is not known to the master"))?;
    let base = format!("http://{}:{}", s(&agent["hostname"]), s(&agent["port"]));
    let agent_state = get_json(&format!("{base}/state")).await?;
    let sandbox = array(&agent_state, "tasks")
        .chain(array(&agent_state, "completed_tasks"))
        .filter(|t| s(&t["id"]) == task_id && s(&t["framework_id"]) == framework_id)
        .map(|t| s(&t["sandbox"]))
        .last()
        .ok_or_else(|| anyhow!("agent {base} no longer has task {task_id}'s sandbox"))?;
    let file = format!("{sandbox}/{}", if args.stderr { "stderr" } else { "stdout" });
    let read = |offset: i64| {
        let url = reqwest::Url::parse_with_params(&format!("{base}/files/read"), &[("path", file.as_str()), ("offset", &offset.to_string())])
            .expect("valid url");
        async move { get_json(url.as_str()).await }
    };
    let mut offset: i64 = 0;
    if let Some(n) = args.lines {
        let size = read(-1).await?["offset"].as_i64().unwrap_or(0);
        // Read back far enough to find N lines (1 MiB at most).
        let start = (size - 1024 * 1024).max(0);
        let data = read(start).await?;
        let text = s(&data["data"]);
        let lines: Vec<&str> = text.lines().collect();
        for line in &lines[lines.len().saturating_sub(n)..] {
            println!("{line}");
        }
        offset = size;
    }
    loop {
        let chunk = read(offset).await.context("reading the sandbox")?;
        let data = s(&chunk["data"]);
        let at = chunk["offset"].as_i64().unwrap_or(offset);
        if !data.is_empty() {
            use std::io::Write;
            print!("{data}");
            let _ = std::io::stdout().flush();
            offset = at + data.len() as i64;
            continue;
        }
        if !args.follow {
            return Ok(0);
        }
        let running = masters
            .state()
            .await
            .ok()
            .and_then(|st| all_tasks(&st, false).into_iter().find(|t| s(&t["id"]) == task_id && s(&t["framework_id"]) == framework_id))
            .is_some_and(|t| !matches!(s(&t["state"]).as_str(), "TASK_FINISHED" | "TASK_FAILED" | "TASK_KILLED" | "TASK_ERROR" | "TASK_LOST" | "TASK_DROPPED" | "TASK_GONE" | "TASK_GONE_BY_OPERATOR"));
        if !running {
            // One last read for output written just before the task ended.
            let last = read(offset).await?;
            print!("{}", s(&last["data"]));
            return Ok(0);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_lookup_by_id_or_unique_part() {
        let tasks = vec![json!({"id": "web-1"}), json!({"id": "web-10"}), json!({"id": "db"})];
        assert_eq!(find_task(&tasks, "web-1").unwrap()["id"], "web-1");
        assert_eq!(find_task(&tasks, "d").unwrap()["id"], "db");
        assert!(find_task(&tasks, "web").unwrap_err().to_string().contains("several"));
        assert!(find_task(&tasks, "zzz").unwrap_err().to_string().contains("no task"));
    }
}
