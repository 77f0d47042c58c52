//! How the OpenAPI document describes the security scheme and each route's refusals.

use super::{ADMIN_PREFIX, PUBLIC_ROUTES};

/// `schema` without its `null` alternative: `type: [string, null]` becomes `type: string`,
/// `oneOf: [{type: null}, X]` becomes `X`.
fn without_null(schema: &mut utoipa::openapi::RefOr<utoipa::openapi::schema::Schema>) {
    use utoipa::openapi::schema::{Schema, SchemaType, Type};
    use utoipa::openapi::RefOr;
    let is_null = |item: &RefOr<Schema>| matches!(item, RefOr::T(Schema::Object(object)) if object.schema_type == SchemaType::Type(Type::Null));
    match schema {
        RefOr::T(Schema::Object(object)) => {
            if let SchemaType::Array(types) = &object.schema_type {
                let types: Vec<Type> = types
                    .iter()
                    .filter(|kind| **kind != Type::Null)
                    .cloned()
                    .collect();
                if let [only] = types.as_slice() {
                    object.schema_type = SchemaType::Type(only.clone());
                }
            }
        }
        RefOr::T(Schema::OneOf(one_of)) => {
            let rest: Vec<RefOr<Schema>> = one_of
                .items
                .iter()
                .filter(|item| !is_null(item))
                .cloned()
                .collect();
            if let [only] = rest.as_slice() {
                *schema = only.clone();
            }
        }
        _ => {}
    }
}

/// Adds what [`guard`] does to every operation of `document` (and states that optional
/// parameters are absent, never null): the bearer scheme (required
/// except on [`PUBLIC_ROUTES`]), and the answers any route can give: 401 (no or a refused
/// token; on public routes only for a refused one), 403 (`/admin/*` for non-admins), 429
/// (rate limits), 431 (headers too large) and 503 (timed out).
pub fn describe_security(document: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::content::Content;
    use utoipa::openapi::header::Header;
    use utoipa::openapi::security::{
        HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme,
    };
    use utoipa::openapi::{Ref, RefOr, ResponseBuilder, Type};

    document
        .components
        .get_or_insert_with(Default::default)
        .add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some(
                        "A token from POST /auth/login, or from a configured OIDC issuer",
                    ))
                    .build(),
            ),
        );
    let problem = |description: &str, headers: &[&str]| {
        let mut response = ResponseBuilder::new().description(description).content(
            petstore_web::PROBLEM_CONTENT_TYPE,
            Content::new(Some(Ref::from_schema_name("ProblemDocument"))),
        );
        for name in headers {
            response = response.header(
                *name,
                Header::new(
                    utoipa::openapi::schema::ObjectBuilder::new().schema_type(Type::String),
                ),
            );
        }
        RefOr::T(response.build())
    };
    for (path, item) in document.paths.paths.iter_mut() {
        let public = PUBLIC_ROUTES.contains(&path.as_str());
        let admin = path.starts_with(ADMIN_PREFIX);
        for operation in [
            &mut item.get,
            &mut item.post,
            &mut item.put,
            &mut item.delete,
            &mut item.patch,
        ]
        .into_iter()
        .flatten()
        {
            // A header or query value is text, never JSON null: an optional one is absent.
            for parameter in operation.parameters.iter_mut().flatten() {
                if let Some(schema) = parameter.schema.as_mut() {
                    without_null(schema);
                }
            }
            operation.security = Some(if public {
                // Anonymous allowed; a token, when sent, is checked.
                vec![
                    SecurityRequirement::default(),
                    SecurityRequirement::new("bearer", Vec::<String>::new()),
                ]
            } else {
                vec![SecurityRequirement::new("bearer", Vec::<String>::new())]
            });
            let responses = &mut operation.responses.responses;
            let unauthorized = if public {
                "The bearer token sent is refused"
            } else {
                "No bearer token, or a refused one"
            };
            responses
                .entry("401".to_owned())
                .or_insert_with(|| problem(unauthorized, &["WWW-Authenticate"]));
            if admin {
                responses
                    .entry("403".to_owned())
                    .or_insert_with(|| problem("Not an admin", &[]));
            }
            if operation.request_body.is_some() {
                for (status, description) in [
                    ("400", "Malformed JSON or header"),
                    ("413", "Body too large"),
                    ("415", "Body is not application/json"),
                    ("422", "Invalid or unknown field"),
                ] {
                    responses
                        .entry(status.to_owned())
                        .or_insert_with(|| problem(description, &[]));
                }
            }
            responses.entry("429".to_owned()).or_insert_with(|| {
                problem(
                    "Rate limit exceeded",
                    &["Retry-After", "RateLimit-Policy", "RateLimit"],
                )
            });
            responses
                .entry("431".to_owned())
                .or_insert_with(|| problem("Request headers too large", &[]));
            responses.entry("503".to_owned()).or_insert_with(|| {
                problem("Unavailable or timed out; retry later", &["Retry-After"])
            });
        }
    }
}
