//! `corral`: the command-line interface to a corral cluster.
//!
//! Exit codes: 0 done; 1 the cluster refused or the operation failed; 2 bad command line; 3 no leading master
//! reachable; 4 the node, framework, task or role named does not exist.

mod client;
mod dev;
mod execute;
mod listing;
mod ops;
mod table;

use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand};

/// corral — run and inspect tasks on a corral cluster.
#[derive(Debug, Parser)]
#[command(name = "corral", version, after_help = "Exit codes: 0 done, 1 refused or failed, 2 usage, 3 no master reachable, 4 not found.")]
struct Cli {
    /// Masters: host:port (or http://host:port), comma-separated for several, or etcd://HOST:PORT[,…][/prefix].
    #[arg(long, global = true, env = "CORRAL_MASTER", default_value = "http://127.0.0.1:5050")]
    master: String,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a command as task(s) on the cluster and wait for it (like mesos-execute).
    Execute(execute::ExecuteArgs),
    /// The cluster at a glance: leader, agents, frameworks, running tasks, resource use.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// Agents (nodes) of the cluster.
    Node {
        #[command(subcommand)]
        command: NodeCommand,
    },
    /// Frameworks (schedulers) of the cluster.
    Framework {
        #[command(subcommand)]
        command: FrameworkCommand,
    },
    /// Tasks of the cluster.
    Task {
        #[command(subcommand)]
        command: TaskCommand,
    },
    /// Roles: DRF weights and quotas.
    Role {
        #[command(subcommand)]
        command: RoleCommand,
    },
    /// Reserve a node's resources for a role, or give them back.
    Reservation {
        #[command(subcommand)]
        command: ReservationCommand,
    },
    /// Print a shell completion script (e.g. `corral completion bash > /etc/bash_completion.d/corral`).
    Completion {
        shell: clap_complete::Shell,
    },
    /// Local development cluster.
    Dev {
        #[command(subcommand)]
        command: DevCommand,
    },
}

#[derive(Debug, Subcommand)]
enum ClusterCommand {
    /// Leader, agents, frameworks, running tasks and resource use.
    Status,
}

#[derive(Debug, Subcommand)]
enum NodeCommand {
    /// List agents with their resources.
    List,
    /// One agent: resources, reservations, attributes, drain state and tasks.
    Show { node: String },
    /// Maintenance: no new offers on the node; its tasks are killed after the deadline.
    Drain {
        node: String,
        /// How long its tasks may keep running (e.g. 0s, 30s, 5m).
        #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
        deadline: Duration,
        /// Wait until none of its tasks is running.
        #[arg(long)]
        wait: bool,
    },
    /// End a drain: the node's resources are offered again.
    Up { node: String },
}

#[derive(Debug, Subcommand)]
enum FrameworkCommand {
    /// List frameworks.
    List {
        /// Include torn-down frameworks.
        #[arg(long)]
        all: bool,
    },
    /// One framework and its tasks.
    Show { framework: String },
    /// Kill a framework's tasks and remove it.
    Teardown { framework: String },
}

#[derive(Debug, Subcommand)]
enum TaskCommand {
    /// List active tasks.
    List {
        /// Include completed tasks.
        #[arg(long)]
        all: bool,
    },
    /// One task: state, placement, resources, health and its state history.
    Show { task: String },
    /// Print a task's stdout (or stderr) from its sandbox.
    Log(listing::LogArgs),
    /// Kill a task (its framework sees TASK_KILLED).
    Kill {
        task: String,
        /// Time between SIGTERM and SIGKILL (default: the task's own).
        #[arg(long, value_parser = humantime::parse_duration)]
        grace: Option<Duration>,
        /// Wait until the task has ended.
        #[arg(long)]
        wait: bool,
    },
}

#[derive(Debug, Subcommand)]
enum RoleCommand {
    /// Roles with weight, share, allocation and quota.
    List,
    /// Set a role's DRF weight.
    Weight { role: String, weight: f64 },
    /// Set (or with --remove, clear) a role's quota.
    Quota {
        role: String,
        /// Offered before roles beyond their guarantees, e.g. "cpus:4;mem:8192".
        #[arg(long)]
        guarantee: Option<String>,
        /// Never more than this, e.g. "cpus:8;mem:16384".
        #[arg(long)]
        limit: Option<String>,
        #[arg(long, conflicts_with_all = ["guarantee", "limit"])]
        remove: bool,
    },
}

#[derive(Debug, Subcommand)]
enum ReservationCommand {
    /// Reserve free resources of a node, e.g. `corral reservation add NODE "cpus(analytics):2;mem(analytics):4096"`.
    Add { node: String, resources: String },
    /// Give reserved, unused resources of a node back to every role.
    Remove { node: String, resources: String },
}

#[derive(Debug, Subcommand)]
enum DevCommand {
    /// Start a local cluster (one master, N agents) in the foreground; Ctrl-C stops it and everything it ran.
    Up(dev::UpArgs),
}

fn main() {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let code = runtime.block_on(run(cli));
    std::process::exit(code);
}

async fn run(cli: Cli) -> i32 {
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).init();
    }
    let master = match client::Masters::parse(&cli.master) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("error: --master: {e}");
            return client::exit::USAGE;
        }
    };
    let json = cli.json;
    let m = &master;
    let result = match cli.command {
        Command::Execute(args) => execute::run(m, args, json).await,
        Command::Cluster { command: ClusterCommand::Status } => ops::cluster_status(m, json).await,
        Command::Node { command } => match command {
            NodeCommand::List => listing::nodes(m, json).await,
            NodeCommand::Show { node } => ops::node_show(m, &node, json).await,
            NodeCommand::Drain { node, deadline, wait } => ops::node_drain(m, &node, deadline, wait, json).await,
            NodeCommand::Up { node } => ops::node_up(m, &node, json).await,
        },
        Command::Framework { command } => match command {
            FrameworkCommand::List { all } => listing::frameworks(m, all, json).await,
            FrameworkCommand::Show { framework } => ops::framework_show(m, &framework, json).await,
            FrameworkCommand::Teardown { framework } => ops::framework_teardown(m, &framework, json).await,
        },
        Command::Task { command } => match command {
            TaskCommand::List { all } => listing::tasks(m, all, json).await,
            TaskCommand::Show { task } => ops::task_show(m, &task, json).await,
            TaskCommand::Log(args) => listing::log(m, args).await,
            TaskCommand::Kill { task, grace, wait } => ops::task_kill(m, &task, grace, wait, json).await,
        },
        Command::Role { command } => match command {
            RoleCommand::List => ops::role_list(m, json).await,
            RoleCommand::Weight { role, weight } => ops::role_weight(m, &role, weight, json).await,
            RoleCommand::Quota { role, guarantee, limit, remove } => ops::role_quota(m, &role, guarantee, limit, remove, json).await,
        },
        Command::Reservation { command } => match command {
            ReservationCommand::Add { node, resources } => ops::reservation(m, &node, &resources, true, json).await,
            ReservationCommand::Remove { node, resources } => ops::reservation(m, &node, &resources, false, json).await,
        },
        Command::Completion { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "corral", &mut std::io::stdout());
            Ok(client::exit::OK)
        }
        Command::Dev { command: DevCommand::Up(args) } => dev::up(args).await,
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            client::exit_code(&e)
        }
    }
}
