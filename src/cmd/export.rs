//! `tsq export slurm FILE DIR`: a pipeline's stages as plain sbatch scripts plus a `submit.sh`
//! that submits them in dependency order, for users who submit by hand or from their own
//! workflow tool. The scripts are those `tsq run --executor slurm` submits.

use std::path::Path;

use super::{CmdError, StageSelection, with_loaded};
use crate::pipeline::Override;

pub fn slurm(file: &Path, overrides: &[Override], dir: &Path) -> Result<(), CmdError> {
    let everything = StageSelection {
        force: Vec::new(),
        only: Vec::new(),
    };
    with_loaded(file, overrides, &everything, |loaded| {
        if std::fs::read_dir(dir).is_ok_and(|mut entries| entries.next().is_some()) {
            return Err(CmdError::Failed(format!(
                "`{}` exists and is not empty: export into a new directory",
                dir.display()
            )));
        }
        let spec = loaded.pipeline.spec.executor.clone().unwrap_or_default();
        let command = super::run::job_command(file, overrides)?;
        let run_root = std::path::absolute(&loaded.run_root)
            .map_err(|e| CmdError::Failed(format!("resolving the run directory: {e}")))?;
        let write = |name: &str, text: &str| {
            let path = dir.join(name);
            crate::fsutil::write_atomic(&path, text.as_bytes())
                .and_then(|()| executable(&path))
                .map_err(|e| CmdError::Failed(format!("cannot write `{}`: {e}", path.display())))
        };
        for stage in &loaded.graph.stages {
            let resources = spec.resources.of(stage.kind);
            let script = crate::exec::job_script(&command, &spec, &resources, &stage.id.0, false)
                .map_err(CmdError::failed)?;
            write(&format!("{}.sh", stage.id.0), &script)?;
        }
        let name = &loaded.pipeline.spec.name;
        let submit = crate::exec::submit_script(loaded.graph, name, &command.workdir, &run_root);
        write("submit.sh", &submit)?;
        println!(
            "{} job scripts and submit.sh in {} (run `sh {}/submit.sh` on a login node)",
            loaded.graph.stages.len(),
            dir.display(),
            dir.display()
        );
        Ok(())
    })
}

fn executable(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
}
