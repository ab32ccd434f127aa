// A libvirt task in a child process that stops with a VM snapshot or a fleecing alive and waits to be killed:
// how tests leave the debris a crashed backup leaves on a libvirt host.
//   node --import tsx test/support/libvirt-child.ts HOME VM snapshot|fleecing RUN_DIR
// Prints "PAUSED <session id>" when there.
import { randomUUID } from 'node:crypto';
import { Catalog } from '../../src/catalog/index.ts';
import { openVm } from '../../src/hypervisor/registry.ts';
import { vmSnapshotLedger } from '../../src/processing/regular-mode.ts';

const [home, vmName, what, runDir] = process.argv.slice(2);
const catalog = Catalog.open(home!);
const target = catalog.getVm(vmName!)!;
const sessionId = randomUUID();
const tag = sessionId.slice(0, 8);
const vm = await openVm(target);
const disks = await vm.listDisks();
const ledger = vmSnapshotLedger(catalog, target, sessionId);
if (what === 'snapshot') await vm.snapshot(disks, { tag, ledger });
else await vm.startFleecing(disks, { tag, ledger, runDir: runDir! });
process.stdout.write(`PAUSED ${sessionId}\n`);
await new Promise(() => undefined); // until SIGKILL
