#[tokio::main]
async fn main() {
    nsm_sdk::tools::daemon::serve_main::<nse::Config, _, _>(nse::run).await
}
