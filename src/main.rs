fn main() -> anyhow::Result<()> {
    illmrec::cli::main()
}
