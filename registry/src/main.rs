#[tokio::main]
async fn main() {
    nsm_sdk::tools::daemon::serve_main::<nsm_registry::Config, _, _>(nsm_registry::run).await
}
