import type { Command } from 'commander';

/** Every command family registers itself here; one line per family keeps merges trivial. */
export function registerCommands(program: Command): void {
  void program;
}
