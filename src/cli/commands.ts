import type { Command } from 'commander';
import { registerRepoCommands } from './repo-commands.ts';

/** Every command family registers itself here; one line per family keeps merges trivial. */
export function registerCommands(program: Command): void {
  registerRepoCommands(program);
}
