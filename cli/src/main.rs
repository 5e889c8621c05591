//! `corral`: the command-line interface to a corral cluster.

mod client;
mod dev;
mod execute;
mod listing;
mod table;

use clap::{Parser, Subcommand};

/// corral — run and inspect tasks on a corral cluster.
#[derive(Debug, Parser)]
#[command(name = "corral", version)]
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
    /// Local development cluster.
    Dev {
        #[command(subcommand)]
        command: DevCommand,
    },
}

#[derive(Debug, Subcommand)]
enum NodeCommand {
    /// List agents with their resources.
    List,
}

#[derive(Debug, Subcommand)]
enum FrameworkCommand {
    /// List frameworks.
    List {
        /// Include torn-down frameworks.
        #[arg(long)]
        all: bool,
    },
}

#[derive(Debug, Subcommand)]
enum TaskCommand {
    /// List active tasks.
    List {
        /// Include completed tasks.
        #[arg(long)]
        all: bool,
    },
    /// Print a task's stdout (or stderr) from its sandbox.
    Log(listing::LogArgs),
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
            return 2;
        }
    };
    let result = match cli.command {
        Command::Execute(args) => execute::run(&master, args, cli.json).await,
        Command::Node { command: NodeCommand::List } => listing::nodes(&master, cli.json).await,
        Command::Framework { command: FrameworkCommand::List { all } } => listing::frameworks(&master, all, cli.json).await,
        Command::Task { command: TaskCommand::List { all } } => listing::tasks(&master, all, cli.json).await,
        Command::Task { command: TaskCommand::Log(args) } => listing::log(&master, args).await,
        Command::Dev { command: DevCommand::Up(args) } => dev::up(args).await,
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    }
}
