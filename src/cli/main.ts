import { CommanderError } from 'commander';
import { SnapshiftError, exitStatusFor, messageOf, ExitStatus } from '../core/errors.ts';
import { createProgram } from './program.ts';

// `snapshift … | head`: once the reader has closed the pipe, further output is dropped without a stack trace.
// The command is not cut short: a backup or restore piped into head still undoes its snapshots and removes
// its partial files, and the exit status is the command's own (0 when it succeeded). git and restic die of
// SIGPIPE instead (status 141), which is fine for a listing but not for a command that must clean up.
for (const stream of [process.stdout, process.stderr]) {
  stream.on('error', (error: NodeJS.ErrnoException) => {
    if (error.code !== 'EPIPE') throw error;
  });
}

const program = createProgram();

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
