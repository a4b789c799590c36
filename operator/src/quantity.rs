//! Kubernetes resource quantities, as far as CPU needs them: `500m`, `0.25`, `2`, `1k`.

/// A CPU quantity that could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("CPU quantity {0:?}: expected a number of cores such as 2, 0.5 or 500m")]
pub struct QuantityError(pub String);

/// A CPU quantity in millicores, rounded up as the API server rounds CPU requests.
pub fn cpu_millis(quantity: &str) -> Result<u64, QuantityError> {
    let err = || QuantityError(quantity.to_owned());
    let q = quantity.trim();
    let (number, scale) = match q.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        None => (q, 1000.0),
        Some((at, _)) => {
            let factor = match &q[at..] {
                "n" => 1e-6,
                "u" => 1e-3,
                "m" => 1.0,
                "k" => 1e6,
                "M" => 1e9,
                "G" => 1e12,
                "Ki" => 1024.0 * 1000.0,
                "Mi" => 1024.0 * 1024.0 * 1000.0,
                _ => return Err(err()),
            };
            (&q[..at], factor)
        }
    };
    let value: f64 = number.parse().map_err(|_| err())?;
    if !value.is_finite() || value < 0.0 {
        return Err(err());
    }
    Ok((value * scale).ceil() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_cores_and_millicores() {
        assert_eq!(cpu_millis("500m"), Ok(500));
        assert_eq!(cpu_millis("2"), Ok(2000));
        assert_eq!(cpu_millis("0.25"), Ok(250));
        assert_eq!(cpu_millis("1.5"), Ok(1500));
        assert_eq!(cpu_millis("100000n"), Ok(1));
        assert!(cpu_millis("lots").is_err());
        assert!(cpu_millis("-1").is_err());
    }
}
