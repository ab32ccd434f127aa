// A backup run in a child process that stops at a chosen moment and waits to be killed: how tests leave
// the debris a crash leaves (a VM snapshot or a storage snapshot nobody will remove).
//   node --import tsx test/support/backup-child.ts HOME REPO MODE PAUSE_AT VM...
// PAUSE_AT: vm-snapshot | storage-snapshot | copy. Prints "PAUSED" when there. Password from SNAPSHIFT_PASSWORD.
// Overlays of non-file disks (RBD) go to SNAPSHIFT_TEST_OVERLAY_FOLDER when set.
import { join } from 'node:path';
import { Catalog } from '../../src/catalog/index.ts';
import { runBackup, type ProcessingMode } from '../../src/processing/backup-run.ts';
import { openRepository } from '../../src/repository/index.ts';

const [home, repoPath, mode, pauseAt, ...vmNames] = process.argv.slice(2);
const catalog = Catalog.open(home!);
const repository = await openRepository(repoPath!, { password: process.env.SNAPSHIFT_PASSWORD });
const pause = async () => {
  process.stdout.write('PAUSED\n');
  await new Promise(() => undefined); // until SIGKILL
};
await runBackup({
  vms: vmNames.map((name) => catalog.getVm(name)!),
  mode: mode as ProcessingMode,
  repository,
  catalog,
  runDir: join(home!, 'run'),
  overlayFolder: process.env['SNAPSHIFT_TEST_OVERLAY_FOLDER'],
  maxReadBytesPerSecond: pauseAt === 'copy' ? 1024 * 1024 : undefined,
  onProgress: (progress) => {
    if (pauseAt === 'copy' && progress.phase === 'copy' && progress.processedBytes > 0) process.stdout.write('COPYING\n');
  },
  hooks: {
    afterVmSnapshots: pauseAt === 'vm-snapshot' ? pause : undefined,
    afterStorageSnapshot: pauseAt === 'storage-snapshot' ? pause : undefined,
  },
});
process.stdout.write('DONE\n');
