import type { Command } from 'commander';
import { registerDemoCommand } from './demo-command.ts';
import { registerLabCommands } from './lab-commands.ts';

/** Every command family registers itself here; one line per family keeps merges trivial. */
export function registerCommands(program: Command): void {
  registerLabCommands(program);
  registerDemoCommand(program);
}
