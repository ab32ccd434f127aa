import type { Command } from 'commander';
import { registerBackupCommands } from './backup-commands.ts';
import { registerDemoCommand } from './demo-command.ts';
import { registerHostCommands } from './host-commands.ts';
import { registerLabCommands } from './lab-commands.ts';
import { registerRepoCommands } from './repo-commands.ts';
import { registerStorageCommands } from './storage-commands.ts';

/** Every command family registers itself here; one line per family keeps merges trivial. */
export function registerCommands(program: Command): void {
  registerRepoCommands(program);
  registerHostCommands(program);
  registerBackupCommands(program);
  registerStorageCommands(program);
  registerLabCommands(program);
  registerDemoCommand(program);
}
