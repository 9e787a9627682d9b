//! The v2 wire's timestamps: RFC 3339 in UTC with exactly six fractional digits
//! (`2023-11-14T22:13:20.000000Z`), one rendering per microsecond.
//!
//! The official server formats with Go's layout `2006-01-02T15:04:05.000000Z` from a unix-µs
//! value; [`format_micros`] produces the same bytes for every instant in years 0000–9999 (the
//! range RFC 3339 can express). [`parse_micros`] reads what an upstream sends back: any number of
//! fractional digits up to nine (truncated to µs) and `Z` or a numeric offset, so a v2 upstream
//! that renders differently still converts.

/// µs in one day.
const MICROS_PER_DAY: i64 = 86_400_000_000;
/// Days from 0000-03-01 to 1970-01-01 in the proleptic Gregorian calendar (Hinnant's era offset).
const UNIX_EPOCH_DAYS_FROM_0000_03_01: i64 = 719_468;
/// First µs of year 0000 (0000-01-01T00:00:00Z).
const MIN_MICROS: i64 = -62_167_219_200_000_000;
/// Last µs of year 9999 (9999-12-31T23:59:59.999999Z).
const MAX_MICROS: i64 = 253_402_300_799_999_999;

/// Why a timestamp could not be rendered or read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TimeError {
    /// The instant is outside years 0000–9999, which RFC 3339 cannot express.
    #[error("time {0} µs is outside RFC 3339's years 0000-9999")]
    OutOfRange(i64),
    /// The text is not an RFC 3339 date-time.
    #[error("not an RFC 3339 date-time")]
    Malformed,
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + UNIX_EPOCH_DAYS_FROM_0000_03_01;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// (year, month, day) → days since 1970-01-01 (inverse of [`civil_from_days`]).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(month);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - UNIX_EPOCH_DAYS_FROM_0000_03_01
}

fn push_digits(out: &mut Vec<u8>, value: i64, width: usize) {
    let mut buf = [b'0'; 6];
    let mut v = value;
    for slot in buf[..width].iter_mut().rev() {
        *slot = b'0' + (v % 10) as u8;
        v /= 10;
    }
    out.extend_from_slice(&buf[..width]);
}

/// Whether [`format_micros`] can render `micros`: it is within years 0000–9999.
pub fn check_range(micros: i64) -> Result<(), TimeError> {
    if !(MIN_MICROS..=MAX_MICROS).contains(&micros) {
        return Err(TimeError::OutOfRange(micros));
    }
    Ok(())
}

/// Appends `micros` (unix µs) as `YYYY-MM-DDTHH:MM:SS.ffffffZ` (27 bytes, no quotes).
pub fn format_micros(micros: i64, out: &mut Vec<u8>) -> Result<(), TimeError> {
    check_range(micros)?;
    let days = micros.div_euclid(MICROS_PER_DAY);
    let in_day = micros.rem_euclid(MICROS_PER_DAY);
    let (year, month, day) = civil_from_days(days);
    let secs = in_day / 1_000_000;
    push_digits(out, year, 4);
    out.push(b'-');
    push_digits(out, i64::from(month), 2);
    out.push(b'-');
    push_digits(out, i64::from(day), 2);
    out.push(b'T');
    push_digits(out, secs / 3600, 2);
    out.push(b':');
    push_digits(out, secs / 60 % 60, 2);
    out.push(b':');
    push_digits(out, secs % 60, 2);
    out.push(b'.');
    push_digits(out, in_day % 1_000_000, 6);
    out.push(b'Z');
    Ok(())
}

/// The same as a `String` (tests, messages).
pub fn format_micros_string(micros: i64) -> Result<String, TimeError> {
    let mut out = Vec::with_capacity(27);
    format_micros(micros, &mut out)?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// Reads a fixed-width run of ASCII digits.
fn digits(s: &[u8], at: usize, width: usize) -> Result<i64, TimeError> {
    let part = s.get(at..at + width).ok_or(TimeError::Malformed)?;
    part.iter().try_fold(0i64, |acc, &c| {
        c.is_ascii_digit()
            .then(|| acc * 10 + i64::from(c - b'0'))
            .ok_or(TimeError::Malformed)
    })
}

fn expect(s: &[u8], at: usize, byte: u8) -> Result<(), TimeError> {
    (s.get(at) == Some(&byte))
        .then_some(())
        .ok_or(TimeError::Malformed)
}

/// Parses an RFC 3339 date-time (`T` or `t` separator, 0–9 fractional digits, `Z`/`z` or
/// `±HH:MM`) into unix µs; digits beyond the sixth are truncated.
pub fn parse_micros(text: &str) -> Result<i64, TimeError> {
    let s = text.as_bytes();
    let year = digits(s, 0, 4)?;
    expect(s, 4, b'-')?;
    let month = digits(s, 5, 2)?;
    expect(s, 7, b'-')?;
    let day = digits(s, 8, 2)?;
    if !matches!(s.get(10), Some(b'T' | b't')) {
        return Err(TimeError::Malformed);
    }
    let hour = digits(s, 11, 2)?;
    expect(s, 13, b':')?;
    let minute = digits(s, 14, 2)?;
    expect(s, 16, b':')?;
    let second = digits(s, 17, 2)?;
    let mut at = 19;
    let mut micros = 0i64;
    if s.get(at) == Some(&b'.') {
        at += 1;
        let start = at;
        while s.get(at).is_some_and(u8::is_ascii_digit) {
            if at - start < 6 {
                micros = micros * 10 + i64::from(s[at] - b'0');
            }
            at += 1;
        }
        let n = at - start;
        if n == 0 || n > 9 {
            return Err(TimeError::Malformed);
        }
        for _ in n..6 {
            micros *= 10;
        }
    }
    let offset_secs = match s.get(at) {
        Some(b'Z' | b'z') if at + 1 == s.len() => 0,
        Some(&sign @ (b'+' | b'-')) if at + 6 == s.len() => {
            let oh = digits(s, at + 1, 2)?;
            expect(s, at + 3, b':')?;
            let om = digits(s, at + 4, 2)?;
            if oh > 23 || om > 59 {
                return Err(TimeError::Malformed);
            }
            let secs = oh * 3600 + om * 60;
            if sign == b'+' { secs } else { -secs }
        }
        _ => return Err(TimeError::Malformed),
    };
    let days_in_month = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        _ => return Err(TimeError::Malformed),
    };
    // 60 is a leap second; like Go, it is accepted and folds into the next minute.
    if day < 1 || day > days_in_month || hour > 23 || minute > 59 || second > 60 {
        return Err(TimeError::Malformed);
    }
    let days = days_from_civil(year, month as u32, day as u32);
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second - offset_secs;
    Ok(secs * 1_000_000 + micros)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fmt(us: i64) -> String {
        format_micros_string(us).unwrap()
    }

    #[test]
    fn known_instants_render_like_go() {
        // The lexicon's own example and the docs' example.
        assert_eq!(fmt(1_700_000_000_000_000), "2023-11-14T22:13:20.000000Z");
        assert_eq!(fmt(1_725_911_162_329_308), "2024-09-09T19:46:02.329308Z");
        assert_eq!(fmt(0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(fmt(-1), "1969-12-31T23:59:59.999999Z");
        assert_eq!(fmt(951_782_400_000_000), "2000-02-29T00:00:00.000000Z");
        assert_eq!(fmt(1_783_175_888_085_434), "2026-07-04T14:38:08.085434Z");
        assert_eq!(fmt(MIN_MICROS), "0000-01-01T00:00:00.000000Z");
        assert_eq!(fmt(MAX_MICROS), "9999-12-31T23:59:59.999999Z");
        assert_eq!(
            format_micros_string(MAX_MICROS + 1),
            Err(TimeError::OutOfRange(MAX_MICROS + 1))
        );
        assert!(format_micros_string(MIN_MICROS - 1).is_err());
        assert!(format_micros_string(i64::MIN).is_err());
    }

    #[test]
    fn format_and_parse_round_trip() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let span = (MAX_MICROS - MIN_MICROS) as u64;
            let us = MIN_MICROS + (x % span) as i64;
            let s = fmt(us);
            assert_eq!(s.len(), 27, "{s}");
            assert_eq!(parse_micros(&s), Ok(us), "{s}");
        }
        // Day boundaries around every month of a leap and a non-leap year.
        for year_start in [1_704_067_200_000_000i64, 1_735_689_600_000_000] {
            for day in 0..366 {
                let us = year_start + day * MICROS_PER_DAY;
                assert_eq!(parse_micros(&fmt(us)), Ok(us));
                assert_eq!(parse_micros(&fmt(us - 1)), Ok(us - 1));
            }
        }
    }

    #[test]
    fn parse_accepts_rfc3339_variants() {
        let base = 1_700_000_000_000_000;
        assert_eq!(parse_micros("2023-11-14T22:13:20Z"), Ok(base));
        assert_eq!(parse_micros("2023-11-14t22:13:20z"), Ok(base));
        assert_eq!(parse_micros("2023-11-14T22:13:20.5Z"), Ok(base + 500_000));
        assert_eq!(parse_micros("2023-11-14T22:13:20.877Z"), Ok(base + 877_000));
        assert_eq!(
            parse_micros("2023-11-14T22:13:20.123456789Z"),
            Ok(base + 123_456)
        );
        assert_eq!(parse_micros("2023-11-15T00:13:20+02:00"), Ok(base));
        assert_eq!(parse_micros("2023-11-14T21:13:20-01:00"), Ok(base));
    }

    #[test]
    fn parse_rejects_malformed() {
        for bad in [
            "",
            "2023-11-14",
            "2023-11-14T22:13:20",
            "2023-11-14 22:13:20Z",
            "2023-11-14T22:13:20.Z",
            "2023-11-14T22:13:20.1234567890Z",
            "2023-13-14T22:13:20Z",
            "2023-02-29T22:13:20Z",
            "2023-11-31T22:13:20Z",
            "2023-11-14T24:13:20Z",
            "2023-11-14T22:60:20Z",
            "2023-11-14T22:13:20Zjunk",
            "2023-11-14T22:13:20+2:00",
            "2023-11-14T22:13:20+24:00",
            "２023-11-14T22:13:20Z",
            "+2023-11-14T22:13:20Z",
        ] {
            assert_eq!(parse_micros(bad), Err(TimeError::Malformed), "{bad:?}");
        }
        assert!(parse_micros("2024-02-29T00:00:00Z").is_ok());
        assert!(parse_micros("2000-02-29T00:00:00Z").is_ok());
        assert!(parse_micros("1900-02-29T00:00:00Z").is_err());
    }
}
