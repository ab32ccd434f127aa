import { Command } from 'commander';
import { registerCommands } from './commands.ts';
import { withExamples } from './help-examples.ts';

/** The whole command tree, unparsed: main.ts runs it, tests walk it. */
export function createProgram(): Command {
  const program = new Command('snapshift')
    .description('VM backup & replication for QEMU/KVM: regular processing and backup from storage snapshots')
    .option('--home <dir>', 'state folder (catalog, config, logs); default $SNAPSHIFT_HOME or /var/lib/snapshift')
    .option('--debug', 'print stack traces on errors')
    .showHelpAfterError()
    .exitOverride();
  withExamples(
    program,
    'snapshift doctor',
    'snapshift repo init /srv/backups',
    'snapshift backup vm1 --repo /srv/backups',
    'snapshift <command> --help',
  );
  registerCommands(program);
  return program;
}
