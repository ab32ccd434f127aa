import { SnapshiftError } from '../core/errors.ts';
import { NbdServer } from '../datamover/nbd/index.ts';
import type { Repository } from '../repository/index.ts';
import { RestorePointExport } from './restore-point-export.ts';

export interface ServeRestorePointOptions {
  repository: Repository;
  vmName: string;
  pointId: string;
  /** Serve only these disks (default every disk). */
  disks?: readonly string[];
  socketPath?: string;
  tcp?: { host: string; port: number };
  /** Stop once a client has connected and every client has gone again. */
  exitWhenUnused?: boolean;
  /** Aborting stops serving. */
  signal: AbortSignal;
  onWarning: (message: string) => void;
  onError: (message: string) => void;
  /** Hears where it serves, once every export accepts connections. */
  onReady: (served: ServedRestorePoint) => void;
}

export interface ServedRestorePoint {
  vm: string;
  restorePoint: string;
  createdAt: string;
  pid: number;
  socket: string | null;
  tcp: { host: string; port: number } | null;
  exports: Array<{ disk: string; sizeBytes: number; uri?: string; tcpUri?: string }>;
}

/**
 * Serves a restore point's disks read-only over our NBD server until `signal` aborts (or, with
 * `exitWhenUnused`, its clients are gone), holding the repository's shared lock from before the restore point
 * is read until the last export closes, so gc waits for it.
 */
export async function serveRestorePoint(options: ServeRestorePointOptions): Promise<void> {
  const { repository, vmName } = options;
  await using _lock = await repository.lockForReading(`serving ${vmName} over NBD`, options.onWarning);
  const reader = await repository.openRestorePoint(options.pointId);
  if (reader.summary.vmName !== vmName) throw new SnapshiftError('USAGE', `restore point ${reader.summary.id} belongs to ${reader.summary.vmName}, not ${vmName}`);
  const diskNames = options.disks ?? reader.summary.disks.map((disk) => disk.name);
  const exports: RestorePointExport[] = [];
  try {
    for (const disk of diskNames) exports.push(await RestorePointExport.open(reader, disk, { onWarning: options.onWarning, lockPurpose: `serving ${vmName} over NBD` }));
    await using server = await NbdServer.listen({
      exports,
      ...(options.socketPath ? { socketPath: options.socketPath } : {}),
      ...(options.tcp ? { tcp: options.tcp } : {}),
      onError: options.onError,
    });
    options.onReady({
      vm: vmName,
      restorePoint: reader.summary.id,
      createdAt: reader.summary.createdAt,
      pid: process.pid,
      socket: options.socketPath ?? null,
      tcp: server.tcpAddress ?? null,
      exports: exports.map((source) => ({
        disk: source.name,
        sizeBytes: source.sizeBytes,
        ...(options.socketPath ? { uri: server.uriOf(source.name) } : {}),
        ...(server.tcpAddress ? { tcpUri: `nbd://${server.tcpAddress.host}:${server.tcpAddress.port}/${encodeURIComponent(source.name)}` } : {}),
      })),
    });
    await new Promise<void>((resolveStop) => {
      const { signal } = options;
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
}
