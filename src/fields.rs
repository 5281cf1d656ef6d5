//! How the request types' JSON fields are read and constrained, shared by
//! every front door's body type (`jobs::JobRequest`, `http::sagemaker::Invocation`)
//! and by the OpenAPI document generated from them: the string patterns the
//! schemas state, and integer fields that take what JSON Schema's `integer`
//! allows.

/// A string with a character that is not white space, and no NUL (what
/// `text` must be: it is trimmed to check it is not blank, and NUL is refused).
pub const NON_BLANK: &str = r"^[^\u0000]*[^\s\u0000][^\u0000]*$";
/// A string without NUL (refused in prompts).
pub const NO_NUL: &str = r"^[^\u0000]*$";

/// Deserializes the integer fields of the request types: JSON Schema's
/// `integer` is any number without a fractional part, so `8.0` is one as `8`
/// is (serde's own `usize` refuses it).
pub mod integer {
    use std::fmt;
    use std::marker::PhantomData;

    use serde::Deserializer;
    use serde::de::{Error, Visitor};

    struct Integer<T>(PhantomData<T>);

    impl<T: TryFrom<u64>> Integer<T> {
        fn fit<E: Error>(v: u64) -> Result<T, E> {
            T::try_from(v).map_err(|_| E::custom(format!("{v} is too large")))
        }
    }

    impl<'de, T: TryFrom<u64>> Visitor<'de> for Integer<T> {
        type Value = T;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a non-negative integer")
        }

        fn visit_u64<E: Error>(self, v: u64) -> Result<T, E> {
            Self::fit(v)
        }

        fn visit_i64<E: Error>(self, v: i64) -> Result<T, E> {
            u64::try_from(v)
                .map_err(|_| E::custom(format!("{v} is negative")))
                .and_then(Self::fit)
        }

        fn visit_f64<E: Error>(self, v: f64) -> Result<T, E> {
            // 2^64 is the first float over u64::MAX.
            if v.fract() != 0.0 || !(0.0..18_446_744_073_709_551_616.0).contains(&v) {
                return Err(E::custom(format!("{v} is not a non-negative integer")));
            }
            Self::fit(v as u64)
        }
    }

    struct Optional<T>(PhantomData<T>);

    impl<'de, T: TryFrom<u64>> Visitor<'de> for Optional<T> {
        type Value = Option<T>;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a non-negative integer or null")
        }

        fn visit_none<E: Error>(self) -> Result<Option<T>, E> {
            Ok(None)
        }

        fn visit_unit<E: Error>(self) -> Result<Option<T>, E> {
            Ok(None)
        }

        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Option<T>, D::Error> {
            d.deserialize_any(Integer(PhantomData)).map(Some)
        }
    }

    /// `Option<usize>`/`Option<u64>` fields: `null` or absent is `None`.
    pub fn option<'de, D: Deserializer<'de>, T: TryFrom<u64>>(d: D) -> Result<Option<T>, D::Error> {
        d.deserialize_option(Optional(PhantomData))
    }

    /// `scheduler_options`: a number without a fractional part becomes an
    /// integer (`"solver_order": 2.0` is `2`), so the integer options take
    /// what the schema's `integer` allows; the other values pass unchanged.
    pub fn options<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<serde_json::Map<String, serde_json::Value>>, D::Error> {
        use serde::Deserialize;
        use serde_json::Value;
        let mut options = Option::<serde_json::Map<String, Value>>::deserialize(d)?;
        if let Some(o) = options.as_mut() {
            super::integral_numbers(o);
        }
        Ok(options)
    }
}

/// Numbers without a fractional part become integers (`2.0` is `2`), so the
/// integer scheduler options take what JSON Schema's `integer` allows.
pub fn integral_numbers(options: &mut serde_json::Map<String, serde_json::Value>) {
    use serde_json::{Number, Value};
    for value in options.values_mut() {
        let Some(f) = value.as_f64().filter(|_| value.is_f64()) else {
            continue;
        };
        if f.fract() == 0.0 && f.abs() < 9_007_199_254_740_992.0 {
            // Exact: |f| < 2^53.
            *value = Value::Number(Number::from(f as i64));
        }
    }
}
