// Factory stamps: `generateStamps` end to end for N devices with authority-made keys — P-256 key
// generation, X25519 onboarding key, certificate signed by the issuing CA (file backend), devices,
// certificates, stamp rows and audit entries committed (SQLite, synchronous=FULL) before the files,
// one JSON stamp file per device, the summary CSV.
//
// Ceiling: P-256 key generation + one ECDSA signature on one thread (generateKeyPairSync + sign of a
// certificate-sized message), in the same run; the target is ≥ 1.0× (the work is spread over both
// cores). Beside it, the shell loop people use today: openssl genpkey + req + x509 -req per device,
// measured for a few hundred devices.
//
// Beside them, the file system floor: the rate one thread creates files of a stamp's size in one
// directory doing nothing else (one file per device is the json/tlv/nvs formats' shape), measured after
// the run in a sibling directory.
//
// Env: HALLMARK_BENCH_STAMPS [100,000], HALLMARK_BENCH_STAMP_OPENSSL [200], HALLMARK_BENCH_STAMP_FORMATS [json].

import { execFileSync } from 'node:child_process';
import { closeSync, mkdirSync, openSync, readdirSync, statSync, writeSync } from 'node:fs';
import { generateKeyPairSync, randomBytes, sign } from 'node:crypto';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Authority } from '../src/authority/authority.js';
import { initAuthority } from '../src/authority/init.js';
import { generateStamps, type StampFormatName } from '../src/authority/stamping.js';
import { figure, log, type Figure } from './figure.js';

const STAMPS = Number(process.env.HALLMARK_BENCH_STAMPS ?? 100_000);
const OPENSSL_DEVICES = Number(process.env.HALLMARK_BENCH_STAMP_OPENSSL ?? 200);
const FORMATS = (process.env.HALLMARK_BENCH_STAMP_FORMATS ?? 'json').split(',') as StampFormatName[];
const PASSPHRASE = 'stamp bench passphrase';
const FLOOR_FILES = Math.min(STAMPS, 20_000);

function oneThreadCeiling(ms = 2000): number {
  const message = randomBytes(400);
  let n = 0;
  const end = performance.now() + ms;
  while (performance.now() < end) {
    const { privateKey } = generateKeyPairSync('ec', { namedCurve: 'P-256' });
    sign('sha256', message, privateKey);
    n++;
  }
  return n / (ms / 1000);
}

/** Bytes of one stamp file of the run (the first one found). */
function stampFileSize(outDir: string): number {
  const name = readdirSync(outDir).find((n) => FORMATS.some((f) => n.endsWith(f === 'tlv' ? '.tlv.bin' : f === 'nvs' ? '.csv' : '.json')) && !n.startsWith('stamps-'));
  return name ? statSync(join(outDir, name)).size : 2500;
}

/** Files/s that this file system allows one thread, for files of a stamp's size in one directory. */
function fileCreationFloor(floorDir: string, files: number, size: number): number {
  mkdirSync(floorDir);
  const data = randomBytes(size);
  const started = performance.now();
  for (let i = 0; i < files; i++) {
    const fd = openSync(join(floorDir, `F-${String(i).padStart(6, '0')}.json`), 'w', 0o600);
    writeSync(fd, data);
    closeSync(fd);
  }
  return files / ((performance.now() - started) / 1000);
}

/** The openssl shell loop: a key, a CSR and a CA-signed certificate per device, files on disk. */
async function opensslLoop(dir: string, devices: number): Promise<number> {
  const run = (args: string[]): void => { execFileSync('openssl', args, { cwd: dir, stdio: 'ignore' }); };
  run(['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', 'ca.key', '-out', 'ca.pem', '-subj', '/CN=Loop CA', '-days', '365']);
  const script = join(dir, 'loop.sh');
  await writeFile(script, `set -e
for i in $(seq 1 ${devices}); do
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out dev-$i.key 2>/dev/null
  openssl req -new -key dev-$i.key -subj "/CN=device-$i/O=Acme" -out dev-$i.csr
  openssl x509 -req -in dev-$i.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 365 -out dev-$i.pem 2>/dev/null
done
`);
  const started = performance.now();
  execFileSync('bash', [script], { cwd: dir, stdio: 'ignore' });
  return devices / ((performance.now() - started) / 1000);
}

export async function run(): Promise<Figure[]> {
  const dir = await mkdtemp(join(tmpdir(), 'hallmark-bench-stamps-'));
  const home = join(dir, 'home');
  try {
    await initAuthority({ home, rootDir: join(dir, 'root'), org: 'Bench', passphrase: PASSPHRASE, keyBackend: 'file', actor: 'bench' });
    const authority = await Authority.open(home, PASSPHRASE);
    let rate: number;
    let rssGrowth: number;
    let rssAtTenth = 0;
    let peakRss = 0;
    try {
      await authority.registry.createProduct({ name: 'plug', allowServerKeygen: true, actor: 'bench' });
      await authority.registry.createLine({ name: 'line-b', ca: 'issuing-1', actor: 'bench' });
      const warm = await authority.registry.createBatch({ product: 'plug', line: 'line-b', quota: 2000, actor: 'bench' });
      // The warm-up's files stay until the end: on ext4 without a journal (this machine), creating a file
      // within ~30 s of many deletions scans the deleted inodes (recently_deleted) and costs 5–15× more.
      await generateStamps(authority, { batch: warm, count: 2000, outDir: join(dir, 'warm'), formats: FORMATS, actor: 'bench' });
      const batch = await authority.registry.createBatch({ product: 'plug', line: 'line-b', quota: STAMPS, actor: 'bench' });
      log(`stamps: ${STAMPS.toLocaleString('en')} devices, formats ${FORMATS.join(',')}`);
      const started = performance.now();
      let lastLog = started;
      await generateStamps(authority, {
        batch, count: STAMPS, outDir: join(dir, 'out'), formats: FORMATS, actor: 'bench',
        onProgress: (p) => {
          const rss = process.memoryUsage.rss();
          peakRss = Math.max(peakRss, rss);
          if (!rssAtTenth && p.done >= STAMPS / 10) rssAtTenth = rss;
          if (performance.now() - lastLog > 5000) { lastLog = performance.now(); log(`  ${p.done}/${p.total}`); }
        },
      });
      rate = STAMPS / ((performance.now() - started) / 1000);
      rssGrowth = peakRss - rssAtTenth;
    } finally {
      await authority.close();
    }
    log(`file system floor: ${FLOOR_FILES.toLocaleString('en')} files of a stamp's size, one thread`);
    const floor = fileCreationFloor(join(dir, 'floor'), FLOOR_FILES, stampFileSize(join(dir, 'out')));
    log('ceiling: P-256 keygen + sign on one thread');
    const ceiling = oneThreadCeiling();
    log(`openssl shell loop: ${OPENSSL_DEVICES} devices`);
    const loopDir = join(dir, 'openssl');
    await mkdir(loopDir);
    const openssl = await opensslLoop(loopDir, OPENSSL_DEVICES);
    const mib = (b: number): string => `${(b / 2 ** 20).toFixed(0)} MiB`;
    return [
      figure(`stamps generated (${STAMPS.toLocaleString('en')}, ${FORMATS.join('+')}, sqlite)`, rate, 'stamps/s', ceiling,
        `ceiling: P-256 keygen + sign, one thread; peak RSS ${mib(peakRss)}, growth after the first 10 %: ${mib(rssGrowth)}; ${(rate / floor).toFixed(2)}× the file system floor`),
      figure('file system floor (create + write one stamp-sized file, one thread)', floor, 'files/s', null,
        'bare openSync/writeSync/closeSync in one directory, nothing else: what writing one file per device costs here before any key is made'),
      figure('openssl shell loop (genpkey + req + x509 -req per device)', openssl, 'devices/s', ceiling, `stamps are ${(rate / openssl).toFixed(0)}× faster`),
    ];
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}
