//! The `sdserve serve` router run in this process (integration tests and
//! benches/http.rs, which includes this file by path).

/// Serves the router in this process on a free loopback port, with an engine whose
/// model load the caller controls, and default settings and a temporary storage
/// folder; returns the base URL at once (the model may still be loading).
pub fn serve_in_process<F>(load: F) -> String
where
    F: FnOnce() -> sdserve::Result<sdserve::diffusion::pipelines::StableDiffusion> + Send + 'static,
{
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            let engine = sdserve::engine::Engine::start(load, Default::default());
            let data = tempfile::tempdir().unwrap();
            let storage = sdserve::storage::Storage::open(data.path().to_str().unwrap()).unwrap();
            let jobs = sdserve::jobs::Jobs::new(
                engine.clone(),
                storage,
                Default::default(),
                Default::default(),
            );
            let app = sdserve::http::router(sdserve::http::AppState {
                engine,
                jobs,
                limits: Default::default(),
                cors_origins: vec![],
            });
            axum::serve(listener, app).await.unwrap();
        });
    });
    format!("http://{}", rx.recv().unwrap())
}
