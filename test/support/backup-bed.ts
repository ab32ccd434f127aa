import type { ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { Catalog } from '../../src/catalog/index.ts';
import { exec } from '../../src/core/exec.ts';
import { StorageDaemon } from '../../src/lab/storage-daemon.ts';
import { initRepository, openRepository, type Repository } from '../../src/repository/index.ts';
import { guestWrite } from './guest-io.ts';
import { makeWorkspace } from './workspace.ts';

/** What a backup test works in: a temp folder, a catalog in `<dir>/home`, an encrypted repository in `<dir>/repo`. */
export interface BackupBed {
  workspace: Awaited<ReturnType<typeof makeWorkspace>>;
  catalog: Catalog;
  repository: Repository;
}

export async function openBackupBed(prefix: string, password: string): Promise<BackupBed> {
  const workspace = await makeWorkspace(prefix);
  mkdirSync(join(workspace.dir, 'home'));
  const catalog = Catalog.open(join(workspace.dir, 'home'));
  await initRepository(join(workspace.dir, 'repo'), { password, encryption: true });
  const repository = await openRepository(join(workspace.dir, 'repo'), { password });
  return { workspace, catalog, repository };
}

/**
 * Ends what a test started (backup children by SIGKILL, storage daemons by QMP quit), then closes and removes
 * the bed. Call it from an `after` registered before the lab's, so nothing holds a datastore when it goes.
 */
export async function closeBackupBed(bed: Partial<BackupBed>, started: { daemons?: readonly StorageDaemon[]; children?: readonly ChildProcess[] } = {}): Promise<void> {
  for (const child of started.children ?? []) if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  for (const daemon of started.daemons ?? []) await daemon.stop();
  await bed.repository?.close();
  bed.catalog?.close();
  await bed.workspace?.cleanup();
}

/**
 * A VM stand-in: `<folder>/<name>.qcow2` with random data at its start and near its end, served by a
 * qemu-storage-daemon (sockets under `<bed>/vms/<name>`) and registered in the catalog as host `name`.
 */
export async function startVmStandIn(bed: BackupBed, name: string, folder: string, sizeBytes: number): Promise<{ daemon: StorageDaemon; imagePath: string }> {
  const MiB = 1024 * 1024;
  const imagePath = join(folder, `${name}.qcow2`);
  await exec('qemu-img', ['create', '-q', '-f', 'qcow2', imagePath, String(sizeBytes)]);
  const runDir = join(bed.workspace.dir, 'vms', name);
  mkdirSync(runDir, { recursive: true });
  const daemon = await StorageDaemon.start({ dir: runDir, images: [{ path: imagePath, format: 'qcow2', nodeName: 'disk0' }] });
  await guestWrite(daemon, 0, randomBytes(4 * MiB));
  await guestWrite(daemon, sizeBytes - 3 * MiB, randomBytes(MiB));
  bed.catalog.addHost({ name, kind: 'qemu', qmpSocketPath: daemon.qmpSocketPath, nbdSocketPath: daemon.nbdSocketPath });
  return { daemon, imagePath };
}
