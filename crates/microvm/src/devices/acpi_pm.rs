//! The guest's power button and reset line on a hardware-reduced ACPI
//! platform: one I/O port that the FADT names as the sleep control, sleep
//! status and reset register.
//!
//! Linux powers off by writing `SLP_TYP << 2 | SLP_EN` to the sleep control
//! register, with `SLP_TYP` taken from the DSDT's `\_S5` package, and
//! reboots (without `reboot=k`) by writing the FADT's reset value to the
//! reset register. Both end the VM through eventfds the VMM watches.

use log::{debug, warn};
use vm_superio::Trigger;

use super::EventFdTrigger;

/// The port of the sleep control/status and reset registers.
pub const ACPI_PM_PORT: u16 = 0x3c0;
/// The sleep type `\_S5` announces (soft off).
pub const SLEEP_TYPE_S5: u8 = 5;
/// What the guest writes to the reset register to reset.
pub const RESET_VALUE: u8 = 1;
/// Sleep control register: sleep enable.
const SLP_EN: u8 = 1 << 5;
/// Sleep control register: the sleep type field.
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0b111;
/// Sleep status register: wake status (written to clear it).
const WAK_STS: u8 = 1 << 7;

/// The register's device model.
pub struct AcpiPm {
    reset: EventFdTrigger,
    power_off: EventFdTrigger,
}

impl AcpiPm {
    /// Fires `reset` or `power_off` when the guest asks.
    pub fn new(reset: EventFdTrigger, power_off: EventFdTrigger) -> Self {
        AcpiPm { reset, power_off }
    }

    /// Reads the register: no wake event is ever pending.
    pub fn read(&self) -> u8 {
        0
    }

    /// The guest writes `value`.
    pub fn write(&mut self, value: u8) {
        let sleep_type = (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK;
        let result = if value == RESET_VALUE {
            self.reset.trigger()
        } else if value & SLP_EN != 0 && sleep_type == SLEEP_TYPE_S5 {
            self.power_off.trigger()
        } else {
            // Clearing the wake status, or a sleep state we do not offer.
            if value & WAK_STS == 0 {
                debug!("ACPI sleep control: ignored write {value:#x}");
            }
            Ok(())
        };
        if let Err(e) = result {
            warn!("ACPI PM: signalling the VMM failed: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fired(t: &EventFdTrigger) -> bool {
        t.0.read().is_ok()
    }

    #[test]
    fn s5_powers_off_and_the_reset_value_resets() {
        let reset = EventFdTrigger::new().expect("eventfd");
        let off = EventFdTrigger::new().expect("eventfd");
        let mut pm = AcpiPm::new(
            reset.try_clone().expect("clone"),
            off.try_clone().expect("clone"),
        );
        pm.write(WAK_STS);
        pm.write(SLEEP_TYPE_S5 << SLP_TYP_SHIFT);
        assert!(!fired(&reset) && !fired(&off), "no SLP_EN: nothing");
        pm.write(SLEEP_TYPE_S5 << SLP_TYP_SHIFT | SLP_EN);
        assert!(fired(&off));
        assert!(!fired(&reset));
        pm.write(RESET_VALUE);
        assert!(fired(&reset));
        assert_eq!(pm.read(), 0);
    }
}
