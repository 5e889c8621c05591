//! The operator commands beyond listing: `cluster status`, `node show|drain|up`, `framework show|teardown`,
//! `task show|kill`, `role list|weight|quota`, `reservation add|remove`. Reads come from the master's state views,
//! writes go to its `/api/v1`; every command prints a table or a few aligned lines, or JSON with `--json`.

use std::io::IsTerminal;
use std::time::Duration;

use anyhow::Context;
use reqwest::Method;
use serde_json::{Value, json};

use crate::client::{Masters, exit};
use crate::listing::{all_tasks, array, find_one, find_task, num, s};
use crate::table;

/// Prints `value` as JSON, or `lines` (label, text) aligned.
fn output(json_out: bool, value: &Value, lines: &[(&str, String)]) -> anyhow::Result<()> {
    if json_out {
        println!("{}", serde_json::to_string_pretty(value)?);
    } else {
        let width = lines.iter().map(|(l, _)| l.len()).max().unwrap_or(0);
        for (label, text) in lines {
            println!("{label:<width$}  {text}");
        }
    }
    Ok(())
}

/// A spinner on stderr while waiting, only on a terminal (scripts get clean output).
fn spinner(message: String) -> Option<indicatif::ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new_spinner().with_message(message);
    bar.enable_steady_tick(Duration::from_millis(120));
    Some(bar)
}

fn used(v: &Value, key: &str, unit: &str) -> String {
    format!("{} / {}{unit} used", num(&v["used"][key]), num(&v["total"][key]))
}

pub async fn cluster_status(masters: &Masters, json_out: bool) -> anyhow::Result<i32> {
    let health = masters.get("/health").await?;
    let agents = masters.get("/state/agents").await?;
    let frameworks = masters.get("/state/frameworks").await?;
    let running = masters.get("/state/tasks?state=running&limit=1").await?;
    let count = |list: &Value, key: &str, pick: &dyn Fn(&Value) -> bool| array(list, key).filter(|x| pick(x)).count();
    let registered = count(&agents, "agents", &|a| a["state"] == "REGISTERED" && a["draining"].is_null());
    let draining = count(&agents, "agents", &|a| !a["draining"].is_null());
    let other = array(&agents, "agents").count() - registered - draining;
    let connected = count(&frameworks, "frameworks", &|f| f["connected"] == true);
    let disconnected = array(&frameworks, "frameworks").count() - connected;
    let totals = &agents["totals"];
    let value = json!({
        "leader": health["leader"], "version": health["version"],
        "agents": {"registered": registered, "draining": draining, "other": other},
        "frameworks": {"connected": connected, "disconnected": disconnected},
        "tasks_running": running["total"], "totals": totals,
    });
    let lines = [
        ("LEADER", format!("{} (v{})", s(&health["leader"]), s(&health["version"]))),
        ("AGENTS", format!("{registered} registered, {draining} draining, {other} other")),
        ("FRAMEWORKS", format!("{connected} connected, {disconnected} disconnected")),
        ("TASKS", format!("{} running", s(&running["total"]))),
        ("CPUS", used(totals, "cpus", "")),
        ("MEM", used(totals, "mem", " MiB")),
        ("DISK", used(totals, "disk", " MiB")),
    ];
    output(json_out, &value, &lines)?;
    Ok(exit::OK)
}

/// The agent whose id (or hostname) is, or uniquely contains, `wanted`.
async fn find_node(masters: &Masters, wanted: &str) -> anyhow::Result<Value> {
    let agents = masters.get("/state/agents").await?;
    let all: Vec<Value> = array(&agents, "agents").cloned().collect();
    find_one(&all, wanted, |a| s(&a["id"]).contains(wanted) || s(&a["hostname"]) == wanted, "node", "corral node list")
}

fn resources_text(r: &Value) -> String {
    ["cpus", "mem", "disk", "gpus"]
        .iter()
        .filter(|k| r[**k].as_f64().unwrap_or(0.0) != 0.0)
        .map(|k| format!("{k}:{}", num(&r[*k])))
        .chain(r.get("ports").and_then(Value::as_str).map(|p| format!("ports:{p}")))
        .collect::<Vec<_>>()
        .join(";")
}

pub async fn node_show(masters: &Masters, wanted: &str, json_out: bool) -> anyhow::Result<i32> {
    let node = find_node(masters, wanted).await?;
    let id = s(&node["id"]);
    let tasks = masters.get(&format!("/state/tasks?agent={id}&limit=10000")).await?;
    if json_out {
        println!("{}", serde_json::to_string_pretty(&json!({"node": node, "tasks": tasks["tasks"]}))?);
        return Ok(exit::OK);
    }
    let reserved: Vec<String> = node["reserved_resources"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(role, r)| format!("{role}: {}", resources_text(r)))
        .collect();
    let attributes: Vec<String> = node["attributes"].as_object().into_iter().flatten().map(|(k, v)| format!("{k}={}", s(v))).collect();
    let draining = node["draining"].get("deadline").map(|d| format!("yes (tasks killed at {})", s(d))).unwrap_or_else(|| "no".into());
    output(false, &node, &[
        ("ID", id.clone()),
        ("ADDRESS", format!("{}:{}", s(&node["hostname"]), s(&node["port"]))),
        ("STATE", s(&node["state"])),
        ("DRAINING", draining),
        ("RESOURCES", resources_text(&node["resources"])),
        ("USED", or_dash(resources_text(&node["used_resources"]))),
        ("OFFERED", or_dash(resources_text(&node["offered_resources"]))),
        ("RESERVED", if reserved.is_empty() { "-".into() } else { reserved.join(", ") }),
        ("ATTRIBUTES", if attributes.is_empty() { "-".into() } else { attributes.join(" ") }),
    ])?;
    let rows: Vec<Vec<String>> = array(&tasks, "tasks").map(|t| vec![s(&t["id"]), s(&t["state"]), s(&t["framework_id"])]).collect();
    if !rows.is_empty() {
        println!();
        table::print(&["TASK", "STATE", "FRAMEWORK"], &rows);
    }
    Ok(exit::OK)
}

pub async fn node_drain(masters: &Masters, wanted: &str, deadline: Duration, wait: bool, json_out: bool) -> anyhow::Result<i32> {
    let node = find_node(masters, wanted).await?;
    let id = s(&node["id"]);
    let reply = masters.send(Method::POST, &format!("/api/v1/agents/{id}/drain"), Some(json!({"deadline_seconds": deadline.as_secs_f64()}))).await?;
    if wait {
        let bar = spinner(format!("waiting for node {id}'s tasks to end"));
        loop {
            let tasks = masters.get(&format!("/state/tasks?agent={id}&limit=10000")).await?;
            let active = array(&tasks, "tasks").filter(|t| !is_terminal(&s(&t["state"]))).count();
            if active == 0 {
                break;
            }
            if let Some(bar) = &bar {
                bar.set_message(format!("waiting for node {id}'s {active} task(s) to end"));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
    }
    let text = format!("node {id} is draining: no new offers; its tasks are killed after {}", humantime::format_duration(deadline));
    output(json_out, &reply, &[("DRAIN", text)])?;
    Ok(exit::OK)
}

pub async fn node_up(masters: &Masters, wanted: &str, json_out: bool) -> anyhow::Result<i32> {
    let id = s(&find_node(masters, wanted).await?["id"]);
    let reply = masters.send(Method::POST, &format!("/api/v1/agents/{id}/up"), None).await?;
    output(json_out, &reply, &[("UP", format!("node {id} is back in the offer pool"))])?;
    Ok(exit::OK)
}

async fn find_framework(masters: &Masters, wanted: &str) -> anyhow::Result<Value> {
    let list = masters.get("/state/frameworks").await?;
    let all: Vec<Value> = array(&list, "frameworks").chain(array(&list, "completed_frameworks")).cloned().collect();
    let matches = |f: &Value| s(&f["name"]) == wanted || s(&f["id"]).contains(wanted);
    find_one(&all, wanted, matches, "framework", "corral framework list --all")
}

pub async fn framework_show(masters: &Masters, wanted: &str, json_out: bool) -> anyhow::Result<i32> {
    let f = find_framework(masters, wanted).await?;
    let id = s(&f["id"]);
    let tasks = masters.get(&format!("/state/tasks?framework={id}&limit=10000")).await?;
    if json_out {
        println!("{}", serde_json::to_string_pretty(&json!({"framework": f, "tasks": tasks["tasks"]}))?);
        return Ok(exit::OK);
    }
    let roles: Vec<String> = array(&f, "roles").map(s).collect();
    output(false, &f, &[
        ("ID", id.clone()),
        ("NAME", s(&f["name"])),
        ("ROLES", roles.join(",")),
        ("CONNECTED", s(&f["connected"])),
        ("FAILOVER", format!("{}s", num(&f["failover_timeout"]))),
        ("USED", or_dash(resources_text(&f["used_resources"]))),
        ("OFFERS", s(&f["offers"])),
    ])?;
    let rows: Vec<Vec<String>> = array(&tasks, "tasks").map(|t| vec![s(&t["id"]), s(&t["state"]), s(&t["agent_id"])]).collect();
    if !rows.is_empty() {
        println!();
        table::print(&["TASK", "STATE", "AGENT"], &rows);
    }
    Ok(exit::OK)
}

pub async fn framework_teardown(masters: &Masters, wanted: &str, json_out: bool) -> anyhow::Result<i32> {
    let id = s(&find_framework(masters, wanted).await?["id"]);
    let reply = masters.send(Method::POST, &format!("/api/v1/frameworks/{id}/teardown"), None).await?;
    output(json_out, &reply, &[("TEARDOWN", format!("framework {id} removed; its tasks are being killed"))])?;
    Ok(exit::OK)
}

fn is_terminal(state: &str) -> bool {
    corral_proto::v1::TaskState::from_str_name(state).is_some_and(|s| s.is_terminal())
}

pub async fn task_show(masters: &Masters, wanted: &str, json_out: bool) -> anyhow::Result<i32> {
    let state = masters.state().await?;
    let t = find_task(&all_tasks(&state, true), wanted)?;
    if json_out {
        println!("{}", serde_json::to_string_pretty(&t)?);
        return Ok(exit::OK);
    }
    let history: Vec<String> = array(&t, "statuses").map(|x| s(&x["state"])).collect();
    output(false, &t, &[
        ("ID", s(&t["id"])),
        ("NAME", s(&t["name"])),
        ("STATE", s(&t["state"])),
        ("FRAMEWORK", s(&t["framework_id"])),
        ("AGENT", s(&t["agent_id"])),
        ("ROLE", s(&t["role"])),
        ("RESOURCES", or_dash(resources_text(&t["resources"]))),
        ("HEALTHY", if t["healthy"].is_null() { "-".into() } else { s(&t["healthy"]) }),
        ("MESSAGE", or_dash(s(&t["message"]))),
        ("HISTORY", history.join(" -> ")),
    ])?;
    Ok(exit::OK)
}

pub async fn task_kill(masters: &Masters, wanted: &str, grace: Option<Duration>, wait: bool, json_out: bool) -> anyhow::Result<i32> {
    let state = masters.state().await?;
    let t = find_task(&all_tasks(&state, false), wanted)?;
    let (id, framework) = (s(&t["id"]), s(&t["framework_id"]));
    let body = json!({"framework": framework, "grace_seconds": grace.map(|g| g.as_secs_f64())});
    let mut reply = masters.send(Method::POST, &format!("/api/v1/tasks/{id}/kill"), Some(body)).await?;
    let mut text = format!("kill of task {id} sent");
    if wait {
        let bar = spinner(format!("waiting for task {id} to end"));
        let end = loop {
            let page = masters.get(&format!("/state/tasks?framework={framework}&limit=10000")).await?;
            let now = array(&page, "tasks").filter(|x| s(&x["id"]) == id).map(|x| s(&x["state"])).last();
            match now {
                Some(state) if is_terminal(&state) => break state,
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        };
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
        text = format!("task {id} ended {end}");
        reply["state"] = json!(end);
    }
    output(json_out, &reply, &[("KILL", text)])?;
    Ok(exit::OK)
}

pub async fn role_list(masters: &Masters, json_out: bool) -> anyhow::Result<i32> {
    let roles = masters.get("/state/roles").await?;
    if json_out {
        println!("{}", serde_json::to_string_pretty(&roles["roles"])?);
        return Ok(exit::OK);
    }
    let rows: Vec<Vec<String>> = array(&roles, "roles")
        .map(|r| {
            vec![
                s(&r["name"]),
                num(&r["weight"]),
                format!("{:.3}", r["share"].as_f64().unwrap_or(0.0)),
                or_dash(resources_text(&r["allocated"])),
                or_dash(resources_text(&r["quota"]["guarantee"])),
                or_dash(resources_text(&r["quota"]["limit"])),
                array(r, "frameworks").count().to_string(),
            ]
        })
        .collect();
    table::print(&["ROLE", "WEIGHT", "SHARE", "ALLOCATED", "GUARANTEE", "LIMIT", "FRAMEWORKS"], &rows);
    Ok(exit::OK)
}

pub async fn role_weight(masters: &Masters, role: &str, weight: f64, json_out: bool) -> anyhow::Result<i32> {
    let reply = masters.send(Method::PUT, &format!("/api/v1/roles/{role}/weight"), Some(json!({"weight": weight}))).await?;
    output(json_out, &reply, &[("WEIGHT", format!("role {role} now weighs {weight}"))])?;
    Ok(exit::OK)
}

pub async fn role_quota(masters: &Masters, role: &str, guarantee: Option<String>, limit: Option<String>, remove: bool, json_out: bool) -> anyhow::Result<i32> {
    let path = format!("/api/v1/roles/{role}/quota");
    let (reply, text) = if remove {
        (masters.send(Method::DELETE, &path, None).await?, format!("role {role} has no quota"))
    } else {
        let body = json!({"guarantee": guarantee.unwrap_or_default(), "limit": limit.unwrap_or_default()});
        let reply = masters.send(Method::PUT, &path, Some(body)).await?;
        let text = format!("role {role}: guarantee {}, limit {}", or_none(resources_text(&reply["guarantee"])), or_none(resources_text(&reply["limit"])));
        (reply, text)
    };
    output(json_out, &reply, &[("QUOTA", text)])?;
    Ok(exit::OK)
}

fn or_dash(text: String) -> String {
    if text.is_empty() { "-".into() } else { text }
}

fn or_none(text: String) -> String {
    if text.is_empty() { "none".into() } else { text }
}

pub async fn reservation(masters: &Masters, node: &str, resources: &str, add: bool, json_out: bool) -> anyhow::Result<i32> {
    let id = s(&find_node(masters, node).await?["id"]);
    let verb = if add { "reserve" } else { "unreserve" };
    let reply = masters
        .send(Method::POST, &format!("/api/v1/agents/{id}/{verb}"), Some(json!({"resources": resources})))
        .await
        .with_context(|| format!("cannot {verb} {resources} on node {id}"))?;
    let text = format!("{verb}d {resources} on node {id}");
    output(json_out, &reply, &[(if add { "RESERVED" } else { "UNRESERVED" }, text)])?;
    Ok(exit::OK)
}
