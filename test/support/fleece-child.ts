// Fleecing in a child process that is killed with it active: how tests leave the debris a crash leaves.
//   node --import tsx test/support/fleece-child.ts QMP_SOCKET NBD_SOCKET TAG LEDGER_FILE [release]
// Starts fleecing every disk of the QEMU process, exports disk 0 and prints "EXPORTED", then waits to be
// killed (or, with "release", releases, which SNAPSHIFT_FAULT=fleece.before-release interrupts). The ledger
// is a file of JSON lines ({"intent": id, "scratch": [...]} / {"clear": id}), written synchronously, as the
// catalog's would be.
import { appendFileSync } from 'node:fs';
import { QmpClient } from '../../src/hypervisor/qemu/qmp-client.ts';
import { listQemuDisks } from '../../src/hypervisor/qemu/qemu-vm.ts';
import { startQemuFleecing } from '../../src/hypervisor/qemu/qemu-fleecing.ts';

const [qmpSocketPath, nbdSocketPath, tag, ledgerFile, then] = process.argv.slice(2) as [string, string, string, string, string | undefined];
const qmp = await QmpClient.connect(qmpSocketPath);
const disks = await listQemuDisks(qmp);
let nextId = 1;
const fleece = await startQemuFleecing(qmp, disks, {
  tag,
  ledger: {
    recordIntent(scratch) {
      const id = nextId++;
      appendFileSync(ledgerFile, `${JSON.stringify({ intent: id, scratch })}\n`);
      return id;
    },
    clear(id) {
      appendFileSync(ledgerFile, `${JSON.stringify({ clear: id })}\n`);
    },
  },
});
await fleece.exportDisk(disks[0]!, 0, { exportName: `snapshift-${tag}-fleece-0`, socketPath: nbdSocketPath, existingServerSocketPath: nbdSocketPath });
process.stdout.write('EXPORTED\n');
if (then === 'release') {
  await fleece.release();
  process.stdout.write('RELEASED\n');
  await qmp.close();
} else {
  await new Promise(() => undefined); // until SIGKILL
}
