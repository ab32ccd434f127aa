import { mkdir } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import type { Command } from 'commander';
import { SnapshiftError } from '../core/errors.ts';
import { socketSafe } from '../core/socket-name.ts';
import { serveRestorePoint } from '../restore/serve-restore-point.ts';
import { homeOf, openCatalog, printJson } from './context.ts';
import { formatBytes } from './format.ts';
import { withExamples } from './help-examples.ts';
import { openRepositoryForCli, repositoryOption, type RepositoryCliOptions } from './repository-access.ts';
import { resolvePoint } from './restore-command.ts';
import { withStopSignals } from './stop-signals.ts';

/** `snapshift serve`: a restore point's disks, read-only over our NBD server, until Ctrl-C or SIGTERM. */
export function registerServeCommand(program: Command): void {
  withExamples(
    repositoryOption(
      program
        .command('serve')
        .description(
          'serve the disks of a restore point read-only over NBD (one export per disk, named after it) until Ctrl-C or SIGTERM; ' +
            'the repository stays share-locked while it serves, so gc waits',
        )
        .argument('<vm>', 'VM name')
        .option('--point <id>', 'restore point id or unique prefix, or "latest"', 'latest')
        .option('--disk <name>', 'serve only this disk (default: every disk)')
        .option('--socket <path>', 'unix socket to listen on (default: <home>/run/serve-<vm>.sock unless --tcp is given)')
        .option('--tcp <host:port>', 'listen on TCP too (port 0 picks a free port); no authentication: use on trusted networks only')
        .option('--json', 'print where it serves as one JSON document once ready')
        .option('--exit-when-unused', 'exit once a client has connected and every client has gone again (instant recovery: a VM that powers off frees the repository)'),
    ),
    'snapshift serve vm1 --point latest',
    'snapshift serve vm1 --point 3f2a --disk vda --socket /run/vm1-vda.sock',
    'nbdinfo --map "nbd+unix:///vda?socket=/run/vm1-vda.sock"',
    'snapshift serve vm1 --tcp 127.0.0.1:10809 --json',
  ).action(async (vmName: string, options: RepositoryCliOptions & { point: string; disk?: string; socket?: string; tcp?: string; json?: boolean; exitWhenUnused?: boolean }, command: Command) => {
    const tcp = options.tcp === undefined ? undefined : parseHostPort(options.tcp);
    let socketPath = options.socket === undefined ? undefined : resolve(options.socket);
    if (!socketPath && !tcp) {
      const runFolder = join(homeOf(command), 'run');
      await mkdir(runFolder, { recursive: true, mode: 0o700 });
      socketPath = join(runFolder, `serve-${socketSafe(vmName)}.sock`);
    }
    await withStopSignals('connections are closed and the repository lock released', async (signal) => {
      using catalog = openCatalog(command);
      await using repository = await openRepositoryForCli(options, catalog, vmName);
      await serveRestorePoint({
        repository,
        vmName,
        pointId: resolvePoint(catalog, vmName, options.point),
        ...(options.disk ? { disks: [options.disk] } : {}),
        ...(socketPath ? { socketPath } : {}),
        ...(tcp ? { tcp } : {}),
        exitWhenUnused: options.exitWhenUnused ?? false,
        signal,
        onWarning: (message) => process.stderr.write(`snapshift: warning: ${message}\n`),
        onError: (message) => process.stderr.write(`snapshift: serve: ${message}\n`),
        onReady: (served) => {
          if (options.json) return printJson(served);
          console.log(`serving ${vmName} restore point ${served.restorePoint} (${served.createdAt}) read-only over NBD; Ctrl-C stops`);
          for (const entry of served.exports) console.log(`  ${entry.disk} (${formatBytes(entry.sizeBytes)}): ${[entry.uri, entry.tcpUri].filter(Boolean).join('  ')}`);
        },
      });
    });
  });
}

function parseHostPort(value: string): { host: string; port: number } {
  const match = /^(\[[^\]]+\]|[^:]+):(\d{1,5})$/.exec(value);
  const port = match ? Number(match[2]) : NaN;
  if (!match || port > 65535) throw new SnapshiftError('USAGE', `--tcp wants HOST:PORT (e.g. 127.0.0.1:10809), not "${value}"`);
  return { host: match[1]!.replace(/^\[|\]$/g, ''), port };
}
