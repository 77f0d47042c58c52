//! The console's static files, embedded in the binary: htmx 2.0.11 and htmx-ext-sse 2.2.4
//! as their npm packages ship them (`dist/htmx.min.js`, `dist/sse.min.js`; licence files
//! beside them), and the console's style sheet. Nothing is fetched at build or run time.

use axum::extract::Path;
use axum::http::header::{self, HeaderValue};
use axum::response::{IntoResponse, Response};
use petstore_web::Problem;

/// A static file.
pub struct Asset {
    /// Its name under `assets/`.
    pub name: &'static str,
    /// Its `Content-Type`.
    pub content_type: &'static str,
    /// Its bytes.
    pub bytes: &'static [u8],
}

/// Every static file the console serves.
pub const ASSETS: [Asset; 3] = [
    Asset {
        name: "htmx.min.js",
        content_type: "text/javascript; charset=utf-8",
        bytes: include_bytes!("../assets/htmx.min.js"),
    },
    Asset {
        name: "htmx-ext-sse.min.js",
        content_type: "text/javascript; charset=utf-8",
        bytes: include_bytes!("../assets/htmx-ext-sse.min.js"),
    },
    Asset {
        name: "console.css",
        content_type: "text/css; charset=utf-8",
        bytes: include_bytes!("../assets/console.css"),
    },
];

/// `GET /petstore-domain/console/assets/{file}`.
pub(crate) async fn serve(Path(file): Path<String>) -> Response {
    let Some(asset) = ASSETS.iter().find(|asset| asset.name == file) else {
        return Problem::not_found(format!("no console asset {file}")).into_response();
    };
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static(asset.content_type),
            ),
            (
                header::CACHE_CONTROL,
                HeaderValue::from_static("public, max-age=3600"),
            ),
        ],
        asset.bytes,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use sha2::{Digest, Sha256};

    use super::*;

    /// The vendored files are the pinned releases, byte for byte.
    #[test]
    fn the_vendored_scripts_are_the_pinned_releases() {
        for (name, sha256) in [
            (
                "htmx.min.js",
                "d6fdc75f204e6bdefa99b69bf1e6d4ac69b8a364f77929f45c13476b4000f717",
            ),
            (
                "htmx-ext-sse.min.js",
                "98a46496de0c3605fbffdce9167ba427bdd9553184f83f149c261891a92c0136",
            ),
        ] {
            let asset = ASSETS
                .iter()
                .find(|asset| asset.name == name)
                .expect("vendored");
            let digest: String = Sha256::digest(asset.bytes)
                .iter()
                .map(|byte| format!("{byte:02x}"))
                .collect();
            assert_eq!(digest, sha256, "{name} is not the pinned release");
        }
    }
}
