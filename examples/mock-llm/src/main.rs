//! `trimtab-mock-llm`: a mock OpenAI- and Anthropic-compatible provider for local runs
//! and benchmarks. Change its behaviour while it runs with
//! `curl -X PUT localhost:PORT/_mock/behaviour -d '{"ttftMs": 500, "fail": "serverError"}'`.

use clap::Parser;
use mock_llm::{Behaviour, MockProvider};

/// A mock LLM provider on 127.0.0.1.
#[derive(Debug, Parser)]
#[command(name = "trimtab-mock-llm")]
struct Cli {
    /// The port to listen on (0: any free port, printed at start).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// The name the mock gives itself in its answers.
    #[arg(long, default_value = "mock")]
    name: String,
    /// The initial behaviour, as the JSON of the control API.
    #[arg(long)]
    behaviour: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mock = MockProvider::start(&cli.name, cli.port).await?;
    if let Some(json) = &cli.behaviour {
        mock.set(serde_json::from_str::<Behaviour>(json)?);
    }
    println!(
        "{} listening: OpenAI base URL {}, Anthropic base URL {}",
        cli.name,
        mock.openai_base_url(),
        mock.anthropic_base_url()
    );
    tokio::signal::ctrl_c().await?;
    Ok(())
}
