//! Token validation never panics and never accepts a token this target did not sign:
//! the issuer's JWKS holds one ES256 key whose private half only the harness has, so any
//! input the validator accepts must be one of the harness's own tokens.
#![no_main]
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use revsync::dev::{issuer_router, DemoIssuer};
use revsync::token::TokenValidator;

struct Harness {
    runtime: tokio::runtime::Runtime,
    validator: Arc<TokenValidator>,
    valid: String,
}

fn harness() -> &'static Harness {
    static H: OnceLock<Harness> = OnceLock::new();
    H.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let (validator, valid) = runtime.block_on(async {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let issuer = Arc::new(
                DemoIssuer::generate(format!("http://{}", l.local_addr().unwrap())).unwrap(),
            );
            let router = issuer_router(issuer.clone());
            tokio::spawn(async move { axum::serve(l, router).await });
            let mut cfg = issuer.config();
            cfg.jwks_min_refetch = std::time::Duration::from_secs(3600);
            let v = TokenValidator::start(
                &[cfg],
                reqwest::Client::new(),
                Arc::new(revsync::metrics::Metrics::new()),
                1000,
                tokio_util::sync::CancellationToken::new(),
            )
            .await;
            (v, issuer.token("alice", "fuzz-1").unwrap())
        });
        Harness {
            runtime,
            validator,
            valid,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let h = harness();
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // Half the inputs are mutations spliced onto a real token, to reach deep paths.
    let token = if text.starts_with('~') {
        format!("{}{}", h.valid, &text[1..])
    } else {
        text.to_string()
    };
    if let Ok(v) = h.runtime.block_on(h.validator.validate(&token)) {
        assert_eq!(
            v.jti.as_deref(),
            Some("fuzz-1"),
            "accepted a token the harness never signed"
        );
    }
});
