import { promises as fs } from 'node:fs';
import path from 'node:path';
import { exec } from '../core/exec.ts';
import { SnapshiftError } from '../core/errors.ts';
import { isMounted, listLoopDevices, loopDevicesBackedBy } from './host-inventory.ts';
import type { LabLayout, DatastoreKind } from './lab-layout.ts';
import type { DatastoreRecord } from './lab-state.ts';
import { sleep } from './owned-process.ts';

/**
 * Makes one datastore: sparse image file → filesystem → loop device → mount → VM and snapshot folders.
 * `record` is called with what is about to exist *before* each step that makes a host resource, and must
 * persist it, so a crash at any point leaves a state file that names everything `lab down` has to remove.
 */
export async function createDatastore(
  layout: LabLayout,
  kind: DatastoreKind,
  sizeBytes: number,
  record: (datastore: DatastoreRecord) => Promise<void>,
): Promise<DatastoreRecord> {
  const datastore: DatastoreRecord = { kind, imagePath: layout.imageFile(kind), sizeBytes, mountPoint: layout.mountPoint(kind) };
  await record(datastore);
  await fs.mkdir(path.dirname(datastore.imagePath), { recursive: true });
  await fs.rm(datastore.imagePath, { force: true });
  // Sparse: a 4 GiB datastore costs only what is written to it.
  await (await fs.open(datastore.imagePath, 'w')).close();
  await fs.truncate(datastore.imagePath, sizeBytes);
  if (kind === 'btrfs') await exec('mkfs.btrfs', ['-q', '-f', datastore.imagePath]);
  // reflink=1 is what makes `cp --reflink=always` (the XFS storage snapshot) possible.
  else await exec('mkfs.xfs', ['-q', '-f', '-m', 'reflink=1', datastore.imagePath]);

  const { stdout } = await exec('losetup', ['--find', '--show', datastore.imagePath], { code: 'LAB_LOOP_FAILED' });
  datastore.loopDevice = stdout.trim();
  await record(datastore);

  await fs.mkdir(datastore.mountPoint, { recursive: true });
  await exec('mount', ['-t', kind, datastore.loopDevice, datastore.mountPoint], { code: 'LAB_MOUNT_FAILED' });
  // On btrfs the VM disks live in their own subvolume: that subvolume is the volume a storage snapshot takes.
  if (kind === 'btrfs') await exec('btrfs', ['subvolume', 'create', layout.vmDisksDir(kind)]);
  else await fs.mkdir(layout.vmDisksDir(kind));
  await fs.mkdir(layout.snapshotsDir(kind));
  return datastore;
}

/**
 * Removes one datastore as recorded: unmount, detach every loop device backed by its image file, delete the
 * image. Safe to repeat and to run on a half-made datastore. The mount point is only rmdir'ed (never removed
 * recursively), so a mount that refused to go can never cost the data under it.
 */
export async function removeDatastore(datastore: DatastoreRecord): Promise<void> {
  if (await isMounted(datastore.mountPoint)) await unmount(datastore.mountPoint);
  const loops = new Set(await loopDevicesBackedBy(datastore.imagePath));
  if (datastore.loopDevice) {
    // Only detach the recorded device if it is still ours: its number may have been reused by someone else.
    const current = (await listLoopDevices()).find((loop) => loop.name === datastore.loopDevice);
    if (current && current.backingFile === datastore.imagePath) loops.add(current.name);
  }
  for (const loop of loops) await exec('losetup', ['--detach', loop], { code: 'LAB_LOOP_FAILED' });
  await fs.rm(datastore.imagePath, { force: true });
  await fs.rmdir(datastore.mountPoint).catch(ignoreMissing);
}

/** umount, retried for a few seconds: a process we just killed may still hold a file open. */
async function unmount(mountPoint: string): Promise<void> {
  const deadline = Date.now() + 10_000;
  for (;;) {
    try {
      await exec('umount', [mountPoint]);
      return;
    } catch (error) {
      if (!(await isMounted(mountPoint))) return;
      if (Date.now() >= deadline) {
        throw new SnapshiftError('LAB_UNMOUNT_FAILED', `cannot unmount ${mountPoint} (${error instanceof Error ? error.message : String(error)}); something still uses it — find it with "fuser -vm ${mountPoint}", then run lab down again`, { cause: error });
      }
      await sleep(200);
    }
  }
}

function ignoreMissing(error: unknown): void {
  const code = (error as NodeJS.ErrnoException).code;
  if (code !== 'ENOENT') throw error;
}
