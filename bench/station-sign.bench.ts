// The offline factory station signing device CSRs with its sub-CA key in a SoftHSM2 token, as
// `hallmark station sign --csr-dir` does: each CSR parsed and verified (proof of possession), checked
// against quota and duplicates, its certificate built from the package, signed through PKCS#11 (one
// session), parsed back against the device profile, and journalled (hash chain, one fdatasync per
// group, a signed checkpoint every 1,000) before it is handed out. Target: ≥ 1,000 CSRs/s.
//
// Ceilings measured in the same run:
//   - raw SoftHSM2 signatures: C_SignInit + C_Sign of a SHA-256 digest in a loop through pkcs11js,
//     one session, nothing else: what the token allows the station at most;
//   - node:crypto alone: verifying a P-256 CSR and signing a certificate-sized TBS with a P-256 key
//     in memory, one thread: the same cryptography without the token.
//
// Env: HALLMARK_BENCH_STATION_CSRS [5000].

import { createHash, sign as nodeSign, verify as nodeVerify, generateKeyPairSync } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pkcs11js from 'pkcs11js';
import { parsePkcs11Uri } from '../src/keys/pkcs11-backend.js';
import { publicKeyFromSpki } from '../src/pki/algorithms.js';
import { parseCsr } from '../src/pki/csr.js';
import { verifyJournal } from '../src/station/journal.js';
import { Station, initStation } from '../src/station/station.js';
import { softHsmAvailable } from '../test/helpers/softhsm.js';
import { createStationToken, makePackage, makeRoot } from '../test/station/fixtures.js';
import { figure, log, type Figure } from './figure.js';
import { benchCsr } from './keys.js';

const CSRS = Number(process.env.HALLMARK_BENCH_STATION_CSRS ?? 5000);


/** Raw token signatures per second: C_SignInit + C_Sign (CKM_ECDSA on a SHA-256 digest), one session. */
function rawTokenRate(module: string, tokenLabel: string, pin: string, keyUri: string, n: number): number {
  const p = new pkcs11js.PKCS11();
  p.load(module);
  p.C_Initialize();
  try {
    const slot = p.C_GetSlotList(true).find((s) => p.C_GetTokenInfo(s).label.replace(/[ \0]+$/, '') === tokenLabel);
    if (!slot) throw new Error(`token ${tokenLabel} not found`);
    const session = p.C_OpenSession(slot, pkcs11js.CKF_SERIAL_SESSION | pkcs11js.CKF_RW_SESSION);
    p.C_Login(session, pkcs11js.CKU_USER, pin);
    p.C_FindObjectsInit(session, [{ type: pkcs11js.CKA_CLASS, value: pkcs11js.CKO_PRIVATE_KEY }, { type: pkcs11js.CKA_ID, value: parsePkcs11Uri(keyUri).id! }]);
    const [key] = p.C_FindObjects(session, 1);
    p.C_FindObjectsFinal(session);
    if (!key) throw new Error('station key not found');
    const digest = createHash('sha256').update('tbs').digest();
    const out = Buffer.alloc(64);
    for (let i = 0; i < 200; i++) { p.C_SignInit(session, { mechanism: pkcs11js.CKM_ECDSA }, key); p.C_Sign(session, digest, out); }
    const t = process.hrtime.bigint();
    for (let i = 0; i < n; i++) {
      p.C_SignInit(session, { mechanism: pkcs11js.CKM_ECDSA }, key);
      p.C_Sign(session, digest, out);
    }
    const rate = n / (Number(process.hrtime.bigint() - t) / 1e9);
    p.C_Logout(session);
    p.C_CloseSession(session);
    return rate;
  } finally {
    p.C_Finalize();
  }
}

/** node:crypto only: verify a P-256 CSR and sign a ~400-byte TBS with an in-memory P-256 key, per CSR. */
function nodeCryptoRate(csrs: readonly Buffer[]): number {
  const { privateKey } = generateKeyPairSync('ec', { namedCurve: 'P-256' });
  const parsed = csrs.map((c) => parseCsr(c));
  const tbs = Buffer.alloc(420, 7);
  const t = process.hrtime.bigint();
  for (const c of parsed) {
    if (!nodeVerify('sha256', c.info, publicKeyFromSpki(c.subjectPublicKeyInfo), c.signature)) throw new Error('CSR does not verify');
    nodeSign('sha256', tbs, privateKey);
  }
  return parsed.length / (Number(process.hrtime.bigint() - t) / 1e9);
}

export async function run(): Promise<Figure[]> {
  if (!softHsmAvailable()) {
    log('station-sign: softhsm2 not installed (apt-get install softhsm2): skipped');
    return [];
  }
  const dir = await mkdtemp(join(tmpdir(), 'hallmark-bench-station-'));
  const tok = await createStationToken('bench-station');
  try {
    await makePackage(join(dir, 'package'), { stationSpki: tok.spki, root: makeRoot(), manifest: { keyUri: tok.keyUri, quota: CSRS + 10 } });
    await initStation({ dir: join(dir, 'station'), packageDir: join(dir, 'package'), pin: tok.token.pin, module: tok.token.module });
    log(`station-sign: making ${CSRS} P-256 CSRs`);
    const csrs = Array.from({ length: CSRS }, () => benchCsr('CN=device'));

    const station = await Station.open({ dir: join(dir, 'station'), pin: tok.token.pin });
    let signed = 0;
    const t = process.hrtime.bigint();
    try {
      const out = await station.sign(csrs.map((data, i) => ({ source: `csr-${i}`, data })), { onDurable: (g) => { for (const o of g) if (o.ok) signed++; } });
      if (out.some((o) => !o.ok)) throw new Error(`a CSR was refused: ${JSON.stringify(out.find((o) => !o.ok))}`);
    } finally {
      await station.close(); // the closing checkpoint is part of the run
    }
    const seconds = Number(process.hrtime.bigint() - t) / 1e9;
    const rate = signed / seconds;
    log(`station-sign: ${signed} signed in ${seconds.toFixed(2)} s`);
    const v = await verifyJournal(join(dir, 'station', 'journal.jsonl'));
    if (v.problems.length || v.entries.length !== CSRS) throw new Error(`the journal does not verify: ${v.problems.slice(0, 3).map((p) => p.message).join('; ')}`);

    const raw = rawTokenRate(tok.token.module, tok.token.token, tok.token.pin, tok.keyUri, Math.min(CSRS, 5000));
    const crypto = nodeCryptoRate(csrs.slice(0, Math.min(CSRS, 3000)));
    return [
      figure('station signing, SoftHSM2 P-256 key (verify CSR + sign + durable journal)', rate, 'CSRs/s', raw,
        `ceiling: raw SoftHSM2 C_SignInit+C_Sign through pkcs11js, one session, same run; node:crypto P-256 CSR verify + certificate sign in memory (no token), one thread: ${Math.round(crypto).toLocaleString('en-US')}/s (station at ${(rate / crypto).toFixed(2)}× of it); ${CSRS} CSRs, target ≥ 1,000/s`),
    ];
  } finally {
    await tok.token.cleanup();
    await rm(dir, { recursive: true, force: true });
  }
}
