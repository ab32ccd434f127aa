import { mkdir } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import type { Command } from 'commander';
import { SnapshiftError } from '../core/errors.ts';
import { socketSafe } from '../core/socket-name.ts';
import { NbdServer } from '../datamover/nbd/index.ts';
import { RestorePointExport } from '../restore/restore-point-export.ts';
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
      const onWarning = (message: string) => process.stderr.write(`snapshift: warning: ${message}\n`);
      // Held from before the restore point is read until the last export closes: gc waits for us.
      await using _lock = await repository.lockForReading(`serving ${vmName} over NBD`, onWarning);
      const reader = await repository.openRestorePoint(resolvePoint(catalog, vmName, options.point));
      if (reader.summary.vmName !== vmName) throw new SnapshiftError('USAGE', `restore point ${reader.summary.id} belongs to ${reader.summary.vmName}, not ${vmName}`);
      const diskNames = options.disk ? [options.disk] : reader.summary.disks.map((disk) => disk.name);
      const exports: RestorePointExport[] = [];
      try {
        for (const disk of diskNames) exports.push(await RestorePointExport.open(reader, disk, { onWarning, lockPurpose: `serving ${vmName} over NBD` }));
        await using server = await NbdServer.listen({
          exports,
          ...(socketPath ? { socketPath } : {}),
          ...(tcp ? { tcp } : {}),
          onError: (message) => process.stderr.write(`snapshift: serve: ${message}\n`),
        });
        const served = exports.map((source) => ({
          disk: source.name,
          sizeBytes: source.sizeBytes,
          ...(socketPath ? { uri: server.uriOf(source.name) } : {}),
          ...(server.tcpAddress ? { tcpUri: `nbd://${server.tcpAddress.host}:${server.tcpAddress.port}/${encodeURIComponent(source.name)}` } : {}),
        }));
        if (options.json) {
          printJson({ vm: vmName, restorePoint: reader.summary.id, createdAt: reader.summary.createdAt, pid: process.pid, socket: socketPath ?? null, tcp: server.tcpAddress ?? null, exports: served });
        } else {
          console.log(`serving ${vmName} restore point ${reader.summary.id} (${reader.summary.createdAt}) read-only over NBD; Ctrl-C stops`);
          for (const entry of served) console.log(`  ${entry.disk} (${formatBytes(entry.sizeBytes)}): ${[entry.uri, entry.tcpUri].filter(Boolean).join('  ')}`);
        }
        await new Promise<void>((resolveStop) => {
          if (signal.aborted) return resolveStop();
          signal.addEventListener('abort', () => resolveStop(), { once: true });
          if (!options.exitWhenUnused) return;
          const watch = setInterval(() => {
            if (server.stats.connectionsAccepted > 0 && server.connectionCount === 0) {
              clearInterval(watch);
              resolveStop();
            }
          }, 250);
          signal.addEventListener('abort', () => clearInterval(watch), { once: true });
        });
      } finally {
        for (const source of exports) await source.close();
      }
    });
  });
}

function parseHostPort(value: string): { host: string; port: number } {
  const match = /^(\[[^\]]+\]|[^:]+):(\d{1,5})$/.exec(value);
  const port = match ? Number(match[2]) : NaN;
  if (!match || port > 65535) throw new SnapshiftError('USAGE', `--tcp wants HOST:PORT (e.g. 127.0.0.1:10809), not "${value}"`);
  return { host: match[1]!.replace(/^\[|\]$/g, ''), port };
}
