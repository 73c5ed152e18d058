fn main() -> std::process::ExitCode {
    cinflow::cli::main()
}
