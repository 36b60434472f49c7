fn main() -> anyhow::Result<()> {
    anyhow::bail!("hull-vmm is not built yet; the lab tests use QEMU microvm until it is")
}
