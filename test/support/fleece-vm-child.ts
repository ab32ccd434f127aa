// Fleecing through the Hypervisor interface in a child process, killed with it active: the debris a crashed
// backup task leaves, for the hunter to find.
//   node --import tsx test/support/fleece-vm-child.ts CATALOG_HOME VM_NAME SESSION_ID RUN_DIR
// Opens the VM from the catalog, starts fleecing of all its disks (ledger row in the catalog, owned by this
// process), exports disk 0 and prints "EXPORTED". On "close" (stdin) it lets go of QMP (so the parent can ask
// QEMU while this process, the session's owner, still runs) and prints "CLOSED"; then waits to be killed.
import { createInterface } from 'node:readline';
import { Catalog } from '../../src/catalog/index.ts';
import { openVm } from '../../src/hypervisor/registry.ts';
import { vmSnapshotLedger } from '../../src/processing/regular-mode.ts';

const [home, vmName, sessionId, runDir] = process.argv.slice(2) as [string, string, string, string];
const catalog = Catalog.open(home);
const target = catalog.getVm(vmName)!;
const vm = await openVm(target);
const disks = await vm.listDisks();
const fleece = await vm.startFleecing(disks, { tag: sessionId.slice(0, 8), ledger: vmSnapshotLedger(catalog, target, sessionId), runDir });
await fleece.exportDisk(disks[0]!, 0);
process.stdout.write('EXPORTED\n');
for await (const line of createInterface({ input: process.stdin })) {
  if (line.trim() === 'close') {
    await vm[Symbol.asyncDispose]();
    process.stdout.write('CLOSED\n');
  }
}
await new Promise(() => undefined); // until SIGKILL
