//! The petstore's security: today the durable trail of security events (logins, refused
//! tokens and callers, rate-limit trips, key-set rotations, admin actions) in [`audit`].
//!
//! Owns what security records and how it is queried. Must not know HTTP: the events arrive
//! with the request's ids already in them. Callers, tokens, OIDC, logins and rate limits are
//! still `petstore-platform`'s (`auth`, `rate_limit`) and move here next (issue 27).

pub mod audit;
