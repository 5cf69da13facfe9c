#[tokio::main]
async fn main() {
    // Before anything that needs an identity or an API server.
    if std::env::args().skip(1).any(|a| a == "--print-crds") {
        print!("{}", nsm_k8s::registryd::crds_yaml());
        return;
    }
    nsm_sdk::tools::daemon::serve_main::<nsm_k8s::registryd::Config, _, _>(nsm_k8s::registryd::run).await
}
