//! A CMOS with a real-time clock that reads the host's UTC time, so that
//! kernels that read the RTC at boot get a sane date.

use std::time::{SystemTime, UNIX_EPOCH};

const RTC_SECONDS: usize = 0x00;
const RTC_MINUTES: usize = 0x02;
const RTC_HOURS: usize = 0x04;
const RTC_DAY_OF_WEEK: usize = 0x06;
const RTC_DAY_OF_MONTH: usize = 0x07;
const RTC_MONTH: usize = 0x08;
const RTC_YEAR: usize = 0x09;
const RTC_REG_A: usize = 0x0a;
const RTC_REG_B: usize = 0x0b;
const RTC_REG_C: usize = 0x0c;
const RTC_REG_D: usize = 0x0d;
const RTC_CENTURY: usize = super::RTC_CENTURY_INDEX as usize;
/// Register B: the clock registers are binary, not BCD.
const REG_B_BINARY: u8 = 1 << 2;
/// Register B: 24-hour mode (otherwise 12-hour with bit 7 of the hour for PM).
const REG_B_24H: u8 = 1 << 1;

/// 128 bytes of CMOS, the clock registers computed on read.
pub struct Cmos {
    index: u8,
    data: [u8; 128],
}

impl Default for Cmos {
    fn default() -> Self {
        Self::new()
    }
}

fn bcd(v: u64) -> u8 {
    (((v / 10) << 4) | (v % 10)) as u8
}

/// A clock field in the encoding register B selects (BCD or binary).
fn encode(v: u64, reg_b: u8) -> u8 {
    if reg_b & REG_B_BINARY != 0 {
        v as u8
    } else {
        bcd(v)
    }
}

/// The hour register: 0-23, or 1-12 with bit 7 set for PM in 12-hour mode.
fn encode_hour(hour: u64, reg_b: u8) -> u8 {
    if reg_b & REG_B_24H != 0 {
        return encode(hour, reg_b);
    }
    let pm = if hour >= 12 { 0x80 } else { 0 };
    let h12 = match hour % 12 {
        0 => 12,
        h => h,
    };
    encode(h12, reg_b) | pm
}

/// Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u64, u64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u64;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u64;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

impl Cmos {
    /// A CMOS with BCD, 24-hour mode clock registers.
    pub fn new() -> Self {
        let mut data = [0u8; 128];
        data[RTC_REG_A] = 0x26;
        data[RTC_REG_B] = 0x02; // 24-hour, BCD
        data[RTC_REG_D] = 0x80; // battery good
        Cmos { index: 0, data }
    }

    /// The index register and the stored bytes.
    pub fn state(&self) -> crate::persist::CmosState {
        crate::persist::CmosState {
            index: self.index,
            data: self.data.to_vec(),
        }
    }

    /// A CMOS with saved contents (missing bytes read as zero, extra ones are ignored).
    pub fn from_state(state: &crate::persist::CmosState) -> Self {
        let mut data = [0u8; 128];
        let n = state.data.len().min(128);
        data[..n].copy_from_slice(&state.data[..n]);
        Cmos {
            index: state.index,
            data,
        }
    }

    /// Reads port `offset` (0 = index, 1 = data).
    pub fn read(&mut self, offset: u16) -> u8 {
        if offset == 0 {
            return self.index;
        }
        let i = (self.index & 0x7f) as usize;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let days = (now / 86_400) as i64;
        let secs = now % 86_400;
        let (year, month, day) = civil_from_days(days);
        let reg_b = self.data[RTC_REG_B];
        match i {
            RTC_SECONDS => encode(secs % 60, reg_b),
            RTC_MINUTES => encode((secs / 60) % 60, reg_b),
            RTC_HOURS => encode_hour(secs / 3600, reg_b),
            RTC_DAY_OF_WEEK => encode(((days + 4).rem_euclid(7) + 1) as u64, reg_b),
            RTC_DAY_OF_MONTH => encode(day, reg_b),
            RTC_MONTH => encode(month, reg_b),
            RTC_YEAR => encode(year.rem_euclid(100) as u64, reg_b),
            RTC_CENTURY => encode(year.div_euclid(100).max(0) as u64, reg_b),
            RTC_REG_C => 0,
            _ => self.data[i],
        }
    }

    /// Writes port `offset` (0 = index, 1 = data).
    pub fn write(&mut self, offset: u16, value: u8) {
        if offset == 0 {
            self.index = value;
        } else {
            let i = (self.index & 0x7f) as usize;
            // The clock itself is the host's; keep writes to other registers.
            if i > RTC_YEAR && i != RTC_CENTURY {
                self.data[i] = value;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }

    #[test]
    fn reads_bcd_clock() {
        let mut c = Cmos::new();
        c.write(0, RTC_MONTH as u8);
        let m = c.read(1);
        assert!((1..=0x12).contains(&m));
        c.write(0, RTC_REG_B as u8);
        assert_eq!(c.read(1), 0x02);
    }

    #[test]
    fn binary_and_12_hour_modes() {
        assert_eq!(encode(59, 0x02), 0x59);
        assert_eq!(encode(59, 0x06), 59);
        assert_eq!(encode_hour(0, 0x00), 0x12);
        assert_eq!(encode_hour(13, 0x00), 0x81);
        assert_eq!(encode_hour(13, 0x04), 0x81);
        assert_eq!(encode_hour(23, 0x06), 23);
        let mut c = Cmos::new();
        c.write(0, RTC_REG_B as u8);
        c.write(1, 0x06);
        c.write(0, RTC_MONTH as u8);
        assert!((1..=12).contains(&c.read(1)));
    }
}
