// Connection checks through the library API with a warm cache: ConnectionChecker.checkCached() for
// the client certificates of 1,000 enrolled devices, round robin — what a TypeScript server does for
// every incoming device connection. The ceiling is the bare minimum of a cached decision: a loop of
// Map lookups by a string key, in the same run.
//
// Env: HALLMARK_BENCH_CONNECT_DEVICES [1000], HALLMARK_BENCH_CONNECT_CHECKS [2,000,000].

import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Authority } from '../src/authority/authority.js';
import { initAuthority } from '../src/authority/init.js';
import { ConnectionChecker } from '../src/connect/decision.js';
import { parseCsr } from '../src/pki/csr.js';
import { figure, log, type Figure } from './figure.js';
import { benchCsr } from './keys.js';

const DEVICES = Number(process.env.HALLMARK_BENCH_CONNECT_DEVICES ?? 1000);
const CHECKS = Number(process.env.HALLMARK_BENCH_CONNECT_CHECKS ?? 2_000_000);
const PASSPHRASE = 'connect-check bench passphrase';


export async function run(): Promise<Figure[]> {
  const dir = await mkdtemp(join(tmpdir(), 'hallmark-bench-connect-'));
  const home = join(dir, 'home');
  try {
    await initAuthority({ home, rootDir: join(dir, 'root'), org: 'Bench', passphrase: PASSPHRASE, keyBackend: 'file', actor: 'bench' });
    const authority = await Authority.open(home, PASSPHRASE);
    const checker = new ConnectionChecker(authority);
    try {
      await authority.registry.createProduct({ name: 'meter', actor: 'bench' });
      await authority.registry.createLine({ name: 'line-a', ca: 'issuing-1', actor: 'bench' });
      const batch = await authority.registry.createBatch({ product: 'meter', line: 'line-a', quota: DEVICES, actor: 'bench' });
      const csrs = Array.from({ length: DEVICES }, () => benchCsr());
      await authority.registry.registerDevices(batch, csrs.map((c) => ({ publicKeySpki: parseCsr(c).subjectPublicKeyInfo })), 'bench');
      const { udidOfKey } = await import('../src/registry/registry.js');
      const chains: Buffer[][] = [];
      for (const c of csrs) {
        const issued = await authority.issueForDevice({ udid: udidOfKey(parseCsr(c).subjectPublicKeyInfo), csr: c, actor: 'bench' });
        chains.push([issued.der, issued.chain[0]!]);
      }
      log(`connect: ${DEVICES} devices enrolled; warming the cache`);
      for (const chain of chains) {
        const d = await checker.check(chain);
        if (!d.allowed) throw new Error(`bench set-up: a fresh device was refused: ${d.reason}`);
      }
      const now = new Date();
      // Warm-up of the measured loop (JIT), then the timed run.
      let allowed = 0;
      for (let i = 0; i < 50_000; i++) allowed += checker.checkCached(chains[i % DEVICES]!, now)?.allowed ? 1 : 0;
      allowed = 0;
      let t = process.hrtime.bigint();
      for (let i = 0; i < CHECKS; i++) if (checker.checkCached(chains[i % DEVICES]!, now)?.allowed) allowed++;
      const checkNs = Number(process.hrtime.bigint() - t);
      if (allowed !== CHECKS) throw new Error(`${CHECKS - allowed} cached checks were not allowed`);
      const rate = CHECKS / (checkNs / 1e9);
      // Ceiling: a Map lookup by a string key per check, the least a cache can do.
      const map = new Map<string, { allowed: boolean }>();
      const keys = chains.map((_, i) => `device-${i}-${'k'.repeat(48)}`);
      keys.forEach((k) => map.set(k, { allowed: true }));
      let hits = 0;
      for (let i = 0; i < 50_000; i++) hits += map.get(keys[i % DEVICES]!)?.allowed ? 1 : 0;
      hits = 0;
      t = process.hrtime.bigint();
      for (let i = 0; i < CHECKS; i++) if (map.get(keys[i % DEVICES]!)?.allowed) hits++;
      const mapNs = Number(process.hrtime.bigint() - t);
      if (hits !== CHECKS) throw new Error('ceiling loop miscounted');
      const ceiling = CHECKS / (mapNs / 1e9);
      log(`connect: ${CHECKS.toLocaleString('en')} cached checks in ${(checkNs / 1e6).toFixed(0)} ms = ${Math.round(rate).toLocaleString('en')}/s (${(checkNs / CHECKS).toFixed(0)} ns each); Map loop ${Math.round(ceiling).toLocaleString('en')}/s`);
      return [figure('connection checks, warm cache (library API)', Math.round(rate), 'checks/s', Math.round(ceiling),
        `${DEVICES} devices, ${CHECKS.toLocaleString('en')} checks round robin, each verifying chain bytes, validity, revocation and device state from the cache; ceiling = a Map lookup by string per check in the same run; target ≥ 1,000,000 checks/s ${rate >= 1_000_000 ? 'met' : 'MISSED'}`)];
    } finally {
      checker.close();
      await authority.close();
    }
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}
