import type { Command } from 'commander';
import { registerBackupCommands } from './backup-commands.ts';
import { registerCatalogCommands } from './catalog-commands.ts';
import { registerDaemonCommand } from './daemon-command.ts';
import { registerDemoCommand } from './demo-command.ts';
import { registerDoctorCommand } from './doctor-command.ts';
import { registerFilesCommands } from './files-command.ts';
import { registerHostCommands } from './host-commands.ts';
import { registerInstantRecoveryCommands } from './instant-recovery-commands.ts';
import { registerJobCommands } from './job-commands.ts';
import { registerLabCommands } from './lab-commands.ts';
import { registerRepoCommands } from './repo-commands.ts';
import { registerRestoreCommand } from './restore-command.ts';
import { registerServeCommand } from './serve-command.ts';
import { registerSessionCommands } from './session-commands.ts';
import { registerStorageCommands } from './storage-commands.ts';
import { registerVerifyBootCommand } from './verify-boot-command.ts';

/** Every command family registers itself here; one line per family keeps merges trivial. */
export function registerCommands(program: Command): void {
  registerRepoCommands(program);
  registerHostCommands(program);
  registerBackupCommands(program);
  registerRestoreCommand(program);
  registerServeCommand(program);
  registerInstantRecoveryCommands(program);
  registerVerifyBootCommand(program);
  registerStorageCommands(program);
  registerJobCommands(program);
  registerSessionCommands(program);
  registerDaemonCommand(program);
  registerLabCommands(program);
  registerDemoCommand(program);
  registerDoctorCommand(program);
  registerCatalogCommands(program);
  registerFilesCommands(program);
}
