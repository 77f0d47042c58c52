//! The `console` section: the operator console (`/petstore-domain/console/`), and its
//! sign-in at an OpenID Provider.

use secrecy::SecretString;
use serde::{Deserialize, Serialize};

use super::{issuer_url, Environment, SecuritySettings, SettingsError};

/// The operator console (`/petstore-domain/console/`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsoleSettings {
    /// A link to a trace in the team's trace UI, `{trace_id}` standing for the trace's id
    /// (`http://127.0.0.1:16686/trace/{trace_id}`); unset, the console shows trace ids
    /// without links.
    pub trace_url_template: Option<String>,
    /// Refuse every write (retries, skips, toggles, forced breakers) and render no control
    /// for one: a console to look only.
    pub read_only: bool,
    /// Show the events of dead letters (their payloads hold what customers sent); hidden
    /// by default.
    pub show_payloads: bool,
    /// How long a live page's stream lasts before the server ends it (the browser then
    /// reconnects and carries on): a forgotten tab holds nothing for ever, and a balancer
    /// can move the page to another instance.
    pub live_max_seconds: u64,
    /// Signing in at an OpenID Provider (authorization code with PKCE) besides the local
    /// users; unset, the login page offers the local users only.
    pub oidc: Option<ConsoleOidcSettings>,
}

impl Default for ConsoleSettings {
    fn default() -> Self {
        Self {
            trace_url_template: None,
            read_only: false,
            show_payloads: false,
            live_max_seconds: 300,
            oidc: None,
        }
    }
}

/// The console as a client of an OpenID Provider. The provider's access token becomes the
/// session, so the issuer must also be one of `security.oidc.issuers` (whose audience, roles
/// claim and keys check it on every request).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleOidcSettings {
    /// The provider: exactly the `issuer` of one of `security.oidc.issuers`. Its endpoints
    /// are discovered from `{issuer}/.well-known/openid-configuration`.
    pub issuer: String,
    /// The console's client id at the provider.
    pub client_id: String,
    /// The client secret of a confidential client (`PETSTORE__CONSOLE__OIDC__CLIENT_SECRET`),
    /// sent by HTTP Basic; unset, a public client (PKCE alone protects the code).
    #[serde(default, serialize_with = "super::redacted_option")]
    pub client_secret: Option<SecretString>,
    /// The scopes asked for; `openid` must be one of them.
    #[serde(default = "default_scopes")]
    pub scopes: Vec<String>,
    /// The resource indicator (RFC 8707) asked for, so that the access token is issued for
    /// this service's audience (`urn:petstore:api`); unset, none is sent.
    #[serde(default)]
    pub resource: Option<String>,
    /// Where the provider sends the browser back: the console's
    /// `.../login/oidc/callback`, as registered at the provider. Unset, it is made from the
    /// request's `Host` (`http` on a loopback host, else `https`).
    #[serde(default)]
    pub redirect_uri: Option<String>,
    /// The sign-in button's text.
    #[serde(default = "default_label")]
    pub label: String,
}

fn default_scopes() -> Vec<String> {
    vec!["openid".to_owned()]
}

fn default_label() -> String {
    "Sign in with your identity provider".to_owned()
}

/// The path the provider sends the browser back to.
pub const CONSOLE_OIDC_CALLBACK: &str = "/petstore-domain/console/login/oidc/callback";

impl ConsoleSettings {
    /// The link to `trace_id`'s trace, when a template is set.
    pub fn trace_url(&self, trace_id: &str) -> Option<String> {
        self.trace_url_template
            .as_ref()
            .map(|template| template.replace(TRACE_ID_PLACEHOLDER, trace_id))
    }

    pub(super) fn validate(
        &self,
        security: &SecuritySettings,
        environment: &Environment,
    ) -> Result<(), SettingsError> {
        if let Some(template) = &self.trace_url_template {
            let invalid =
                |reason: &str| SettingsError::invalid("console.trace_url_template", reason);
            if !template.contains(TRACE_ID_PLACEHOLDER) {
                return Err(invalid("must contain {trace_id}"));
            }
            match url::Url::parse(&template.replace(TRACE_ID_PLACEHOLDER, "0")) {
                Ok(url) if matches!(url.scheme(), "http" | "https") && url.has_host() => {}
                _ => return Err(invalid("must be an http or https URL")),
            }
        }
        if let Some(oidc) = &self.oidc {
            oidc.validate(security, environment)?;
        }
        Ok(())
    }
}

impl ConsoleOidcSettings {
    fn validate(
        &self,
        security: &SecuritySettings,
        environment: &Environment,
    ) -> Result<(), SettingsError> {
        let invalid = |key: &str, reason: String| {
            SettingsError::invalid(format!("console.oidc.{key}"), reason)
        };
        if !security
            .oidc
            .issuers
            .iter()
            .any(|issuer| issuer.issuer == self.issuer)
        {
            return Err(invalid(
                "issuer",
                format!(
                    "{:?} is not one of security.oidc.issuers: the session is that issuer's access token, checked like any other",
                    self.issuer
                ),
            ));
        }
        if self.client_id.trim().is_empty() {
            return Err(invalid("client_id", "must not be empty".to_owned()));
        }
        if !self.scopes.iter().any(|scope| scope == "openid") {
            return Err(invalid(
                "scopes",
                "must include openid (the ID token proves who signed in)".to_owned(),
            ));
        }
        if self
            .scopes
            .iter()
            .any(|scope| scope.is_empty() || scope.contains(char::is_whitespace))
        {
            return Err(invalid(
                "scopes",
                "each scope is one non-empty word".to_owned(),
            ));
        }
        if let Some(uri) = &self.redirect_uri {
            issuer_url(uri).map_err(|reason| invalid("redirect_uri", reason))?;
            let path_matches = url::Url::parse(uri).is_ok_and(|url| {
                url.path() == CONSOLE_OIDC_CALLBACK
                    && url.query().is_none()
                    && url.fragment().is_none()
            });
            if !path_matches {
                return Err(invalid(
                    "redirect_uri",
                    format!("must be this service's {CONSOLE_OIDC_CALLBACK}, with no query"),
                ));
            }
        }
        if self.label.trim().is_empty() {
            return Err(invalid("label", "must not be empty".to_owned()));
        }
        // The sign-in's cookie is signed with a key derived from the token secret, which
        // every instance shares (a sign-in may start on one and end on another).
        if security.jwt.secret.is_none() && !environment.is_local() {
            return Err(SettingsError::invalid(
                "security.jwt.secret",
                "console.oidc needs it: it keys the sign-in's cookie and the console's CSRF tokens, alike on every instance",
            ));
        }
        Ok(())
    }
}

/// What `console.trace_url_template` puts a trace's id in place of.
pub const TRACE_ID_PLACEHOLDER: &str = "{trace_id}";

#[cfg(test)]
mod tests {
    use super::super::Settings;
    use super::*;

    #[test]
    fn a_trace_url_template_must_be_an_http_url_with_the_trace_id() {
        let with = |template: &str| {
            let mut settings = Settings::default();
            settings.console.trace_url_template = Some(template.to_owned());
            settings
        };
        let fine = with("http://127.0.0.1:16686/trace/{trace_id}");
        fine.validate().expect("a valid template");
        assert_eq!(
            fine.console.trace_url("abc").as_deref(),
            Some("http://127.0.0.1:16686/trace/abc")
        );
        for bad in [
            "http://127.0.0.1:16686/trace/",
            "javascript:{trace_id}",
            "{trace_id}",
        ] {
            let error = with(bad).validate().expect_err(bad);
            assert!(
                error.to_string().contains("console.trace_url_template"),
                "{bad}: {error}"
            );
        }
        assert_eq!(Settings::default().console.trace_url("abc"), None);
    }

    #[test]
    fn an_oidc_sign_in_names_a_configured_issuer_openid_and_the_callback() {
        let issuer = "http://127.0.0.1:9000";
        type Change = fn(&mut ConsoleOidcSettings);
        let with = |change: Change| {
            let mut settings = Settings::default();
            settings.security.oidc.issuers = vec![serde_json::from_value(serde_json::json!({
                "issuer": issuer, "audience": "petstore-api",
            }))
            .expect("issuer settings")];
            let mut oidc: ConsoleOidcSettings = serde_json::from_value(serde_json::json!({
                "issuer": issuer, "client_id": "petstore-console",
            }))
            .expect("defaults");
            change(&mut oidc);
            settings.console.oidc = Some(oidc);
            settings
        };
        with(|_| {}).validate().expect("the defaults are valid");
        with(|oidc| {
            oidc.redirect_uri =
                Some("https://ops.example/petstore-domain/console/login/oidc/callback".to_owned());
        })
        .validate()
        .expect("an https callback");
        let refused: [(&str, Change); 6] = [
            ("console.oidc.issuer", |oidc| {
                oidc.issuer = "http://127.0.0.1:9001".to_owned();
            }),
            ("console.oidc.client_id", |oidc| {
                oidc.client_id = " ".to_owned()
            }),
            ("console.oidc.scopes", |oidc| {
                oidc.scopes = vec!["profile".to_owned()];
            }),
            ("console.oidc.redirect_uri", |oidc| {
                oidc.redirect_uri = Some(
                    "http://ops.example/petstore-domain/console/login/oidc/callback".to_owned(),
                );
            }),
            ("console.oidc.redirect_uri", |oidc| {
                oidc.redirect_uri = Some("https://ops.example/elsewhere".to_owned());
            }),
            ("console.oidc.label", |oidc| oidc.label = String::new()),
        ];
        for (key, change) in refused {
            let error = with(change).validate().expect_err(key);
            assert!(error.to_string().contains(key), "{key}: {error}");
        }
        let mut production = with(|_| {});
        production.environment = Environment("production".to_owned());
        production.security.jwt.secret = None;
        let error = production.validate().expect_err("no secret");
        assert!(error.to_string().contains("console.oidc"), "{error}");
    }
}
