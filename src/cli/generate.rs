//! `deployd generate`: man pages and shell completions, rendered from the command-line
//! definitions themselves (`clap_mangen`, `clap_complete`), so they never drift from `--help`.
//!
//! The packages ship what `deployd generate all --out DIR` writes (see `Cargo.toml`'s
//! `[package.metadata.deb]` and `[package.metadata.generate-rpm]`):
//!
//! ```text
//! DIR/man/deployd.1.gz, DIR/man/deployd-<command>.1.gz   → /usr/share/man/man1/
//! DIR/completions/deployd                                → bash-completion's completions/
//! DIR/completions/_deployd                               → zsh's vendor completions
//! DIR/completions/deployd.fish                           → fish's vendor_completions.d/
//! ```

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::{CommandFactory, Subcommand};
use clap_complete::Shell;

use super::{Cli, Failure};
use crate::error::exit;
use crate::files::{FileError, write_atomic};

/// What `deployd generate` writes.
#[derive(Debug, Subcommand)]
pub(crate) enum Generate {
    /// Man pages: deployd.1 and one page per command (deployd-deploy.1, ...).
    Man {
        /// The directory to write them to (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// Compress them (deployd.1.gz, ...), as distributions install them.
        #[arg(long)]
        gzip: bool,
    },
    /// The completion script for SHELL, on stdout or in DIR under its usual file name.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: Shell,
        /// Write `deployd` (bash), `_deployd` (zsh), `deployd.fish` (fish), ... in this
        /// directory instead of printing the script.
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
    /// What the packages ship: DIR/man/*.1.gz and DIR/completions/ for bash, zsh and fish.
    All {
        /// The directory to write them to (created if missing).
        #[arg(long)]
        out: PathBuf,
    },
}

fn failure(e: FileError) -> Failure {
    Failure {
        code: exit::SOFTWARE,
        message: e.to_string(),
    }
}

/// Writes `bytes` to `dir/name`, creating `dir`.
fn write(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), Failure> {
    std::fs::create_dir_all(dir).map_err(|e| failure(FileError::on("create", dir)(e)))?;
    write_atomic(&dir.join(name), bytes, 0o644).map_err(failure)
}

/// The command line as the pages and scripts describe it.
fn command() -> clap::Command {
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    cmd
}

/// Renders one page per visible command, `deployd.1` first; `(file name, roff)`.
fn man_pages() -> Result<Vec<(String, Vec<u8>)>, std::io::Error> {
    fn walk(cmd: &clap::Command, out: &mut Vec<(String, Vec<u8>)>) -> std::io::Result<()> {
        let man = clap_mangen::Man::new(cmd.clone())
            .source(concat!("deployd ", env!("CARGO_PKG_VERSION")))
            .manual("deployd manual");
        let mut page = Vec::new();
        man.render(&mut page)?;
        out.push((man.get_filename(), page));
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            walk(sub, out)?;
        }
        Ok(())
    }
    let mut pages = Vec::new();
    walk(&command(), &mut pages)?;
    Ok(pages)
}

fn gzip(bytes: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(bytes)?;
    gz.finish()
}

fn write_man(out: &Path, compress: bool) -> Result<usize, Failure> {
    let render_failed =
        |e: std::io::Error| failure(FileError::on("render the man pages for", out)(e));
    let pages = man_pages().map_err(render_failed)?;
    for (name, page) in &pages {
        if compress {
            write(
                out,
                &format!("{name}.gz"),
                &gzip(page).map_err(render_failed)?,
            )?;
        } else {
            write(out, name, page)?;
        }
    }
    Ok(pages.len())
}

/// The completion script for `shell` and its conventional file name.
fn completion(shell: Shell) -> (String, Vec<u8>) {
    let mut cmd = command();
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut cmd, "deployd", &mut script);
    let name = match shell {
        Shell::Bash => "deployd".to_string(),
        Shell::Zsh => "_deployd".to_string(),
        other => clap_complete::Generator::file_name(&other, "deployd"),
    };
    (name, script)
}

/// Runs `deployd generate ...`; prints what it wrote.
pub(super) fn run(what: Generate) -> Result<i32, Failure> {
    match what {
        Generate::Man { out, gzip } => {
            let n = write_man(&out, gzip)?;
            println!("wrote {n} man pages to {}", out.display());
        }
        Generate::Completions { shell, out } => {
            let (name, script) = completion(shell);
            match out {
                Some(dir) => {
                    write(&dir, &name, &script)?;
                    println!("wrote {}", dir.join(name).display());
                }
                None => {
                    let mut stdout = std::io::stdout().lock();
                    stdout
                        .write_all(&script)
                        .and_then(|()| stdout.flush())
                        .map_err(|e| Failure {
                            code: exit::SOFTWARE,
                            message: format!("cannot write the completion script: {e}"),
                        })?;
                }
            }
        }
        Generate::All { out } => {
            let n = write_man(&out.join("man"), true)?;
            let dir = out.join("completions");
            for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
                let (name, script) = completion(shell);
                write(&dir, &name, &script)?;
            }
            println!(
                "wrote {n} man pages and the bash, zsh and fish completions to {}",
                out.display()
            );
        }
    }
    Ok(exit::OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_page_per_visible_command_and_none_for_generate() {
        let pages = man_pages().unwrap();
        let names: Vec<&str> = pages.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names[0], "deployd.1");
        for page in [
            "deployd-deploy.1",
            "deployd-releases.1",
            "deployd-rollback.1",
        ] {
            assert!(names.contains(&page), "{page} in {names:?}");
        }
        assert!(!names.iter().any(|n| n.contains("generate")), "{names:?}");
        let main = String::from_utf8_lossy(&pages[0].1);
        assert!(main.contains("releases"), "{main}");
    }

    #[test]
    fn completions_know_the_commands_and_their_flags() {
        let (name, bash) = completion(Shell::Bash);
        assert_eq!(name, "deployd");
        let bash = String::from_utf8(bash).unwrap();
        assert!(bash.contains("releases") && bash.contains("--no-containers"));
        assert_eq!(completion(Shell::Zsh).0, "_deployd");
        assert_eq!(completion(Shell::Fish).0, "deployd.fish");
    }
}
