// A backup through runBackup in a child process, for the conformance suite's kills: SNAPSHIFT_FAULT makes it
// SIGKILL itself at a fault point (src/core/fault-points.ts); the parent then hunts what it left.
//   node --import tsx test/support/conformance-child.ts HOME REPO MODE VM
// Password from SNAPSHIFT_PASSWORD. Prints "DONE" if no fault point was reached.
import { join } from 'node:path';
import { Catalog } from '../../src/catalog/index.ts';
import { runBackup, type ProcessingMode } from '../../src/processing/backup-run.ts';
import { openRepository } from '../../src/repository/index.ts';

const [home, repoPath, mode, vmName] = process.argv.slice(2) as [string, string, ProcessingMode, string];
const catalog = Catalog.open(home);
const repository = await openRepository(repoPath, { password: process.env['SNAPSHIFT_PASSWORD'] });
const run = await runBackup({ vms: [catalog.getVm(vmName)!], mode, repository, catalog, runDir: join(home, 'run'), failoverToRegular: false, maxReadBytesPerSecond: 8 * 1024 * 1024 });
process.stdout.write(`DONE ${run.outcomes[0]?.error?.message ?? 'ok'}\n`);
await repository.close();
catalog.close();
