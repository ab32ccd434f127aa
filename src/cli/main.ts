import { Command, CommanderError } from 'commander';
import { SnapshiftError, exitStatusFor, messageOf, ExitStatus } from '../core/errors.ts';
import { registerCommands } from './commands.ts';

const program = new Command('snapshift')
  .description('VM backup & replication for QEMU/KVM: regular processing and backup from storage snapshots')
  .option('--home <dir>', 'state folder (catalog, config, logs); default $SNAPSHIFT_HOME or /var/lib/snapshift')
  .option('--debug', 'print stack traces on errors')
  .showHelpAfterError()
  .exitOverride();

registerCommands(program);

try {
  await program.parseAsync(process.argv);
} catch (error) {
  if (error instanceof CommanderError) {
    // Help and version are "errors" to commander; everything else is a usage error.
    if (error.code === 'commander.helpDisplayed' || error.code === 'commander.version' || error.code === 'commander.help') {
      process.exitCode = ExitStatus.success;
    } else {
      process.exitCode = ExitStatus.usage;
    }
  } else {
    const debug = program.opts<{ debug?: boolean }>().debug === true;
    process.stderr.write(`snapshift: ${debug && error instanceof Error ? error.stack : messageOf(error)}\n`);
    if (debug && error instanceof Error && error.cause) process.stderr.write(`cause: ${String((error.cause as Error).stack ?? error.cause)}\n`);
    process.exitCode = error instanceof SnapshiftError ? exitStatusFor(error) : ExitStatus.failed;
  }
}
