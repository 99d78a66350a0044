//! The `/openapi.json` document (OpenAPI 3.0.3), kept next to the handlers it describes and
//! checked by the server test suite with `openapi-spec-validator`.

/// The document, verbatim.
pub(crate) const DOCUMENT: &str = include_str!("openapi.json");
