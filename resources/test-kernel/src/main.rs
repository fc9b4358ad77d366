//! Prints the path of the built cryo test kernel image, so scripts can do
//! `qemu-system-x86_64 -kernel "$(cargo run -q -p cryo-test-kernel)"`.

fn main() {
    println!("{}", cryo_test_kernel::KERNEL_PATH);
}
