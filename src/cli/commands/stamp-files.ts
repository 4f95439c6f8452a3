// hallmark stamp inspect / factory-key / open: the factory's side of stamps (issue 6, "Company B").
// None of these needs an authority home: a factory has stamp files, its own key, and the OEM's root.

import { createCipheriv, createHash, createPrivateKey, createPublicKey, generateKeyPairSync, randomBytes, scrypt, type KeyObject } from 'node:crypto';
import { mkdir, open, readFile, readdir, rename, rm, rmdir, stat, writeFile } from 'node:fs/promises';
import { basename, dirname, join, resolve } from 'node:path';
import { HallmarkError } from '../../errors.js';
import { openArchive, factoryKeyFingerprint } from '../../factory/archive.js';
import { STAMP_FORMATS, STAMP_FORMAT_NAMES, formatByName, sniffFormat } from '../../factory/formats/index.js';
import { MAX_TLV_INPUT_BYTES } from '../../factory/formats/tlv.js';
import type { Stamp } from '../../factory/stamp.js';
import { parseCertificate, sha256Fingerprint, type ParsedCertificate } from '../../pki/certificate.js';
import { nameToString } from '../../pki/names.js';
import { SIZE_LIMITS, decodePemBlocks, encodePem } from '../../pki/pem.js';
import { octetString, oid, seq, smallInteger } from '../../pki/der.js';
import { verifyIssuedBy } from '../../pki/verify.js';
import { flag, info, out, readPassphrase, required, str, list, type Command, type ParsedArgs } from '../io.js';

const FACTORY_PASSPHRASE_ENV = 'HALLMARK_FACTORY_PASSPHRASE';
const MAX_KEY_FILE = 64 * 1024;

async function readInput(file: string, what: string, maxBytes: number): Promise<Buffer> {
  let size: number;
  try { size = (await stat(file)).size; } catch (err) { throw new HallmarkError('BAD_REQUEST', `cannot read ${what} ${file}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`); }
  if (size > maxBytes) throw new HallmarkError('INPUT_TOO_LARGE', `${what} ${file} is ${size} bytes, over the ${maxBytes}-byte limit`);
  try { return await readFile(file); } catch (err) { throw new HallmarkError('BAD_REQUEST', `cannot read ${what} ${file}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`); }
}

// ---------------------------------------------------------------- stamp inspect

const INSPECT_USAGE = `Usage: hallmark stamp inspect FILE [--format json|tlv|nvs] [--json] [--show-secrets]

Decodes one stamp file (the format is recognised from its content unless --format is given), checks
it (every length and CRC, DER certificates, the device key matching its certificate, the QR payload
matching the PoP secret and onboarding key, and each certificate signed by the next one in the chain)
and prints what it holds. Private keys, the PoP secret and the QR payload (which carries the PoP
secret) are never printed unless --show-secrets is given. Exit 0 when the stamp is good, 1 with the
reason (e.g. "record 7 (certificate, ...) fails its CRC32") when it is not.`;

function describeKey(key: KeyObject): string {
  const d = key.asymmetricKeyDetails ?? {};
  if (key.asymmetricKeyType === 'ec') return ({ prime256v1: 'EC P-256', secp384r1: 'EC P-384', secp521r1: 'EC P-521' } as Record<string, string>)[d.namedCurve ?? ''] ?? `EC ${d.namedCurve}`;
  if (key.asymmetricKeyType === 'rsa') return `RSA-${d.modulusLength}`;
  return String(key.asymmetricKeyType).replace(/^ed25519$/, 'Ed25519').replace(/^x25519$/, 'X25519');
}

interface ChainCheck { readonly subjects: string[]; readonly rootSelfSigned: boolean }

/** Each certificate must be signed by the next; the stamp is refused otherwise. */
function checkChain(cert: ParsedCertificate, chain: readonly ParsedCertificate[]): ChainCheck {
  let current = cert;
  chain.forEach((issuer, i) => {
    try { verifyIssuedBy(current, issuer); } catch (err) {
      const what = current === cert ? 'the certificate' : `chain certificate ${i}`;
      throw new HallmarkError('STAMP_INVALID', `${what} (${nameToString(current.subject)}) is not issued by chain certificate ${i + 1} (${nameToString(issuer.subject)}): ${(err as Error).message}`);
    }
    current = issuer;
  });
  let rootSelfSigned = false;
  if (chain.length) {
    const last = chain[chain.length - 1]!;
    try { verifyIssuedBy(last, last); rootSelfSigned = true; } catch { rootSelfSigned = false; }
  }
  return { subjects: chain.map((c) => nameToString(c.subject)), rootSelfSigned };
}

function validity(cert: ParsedCertificate, now: Date): 'valid' | 'expired' | 'not yet valid' {
  return now < cert.notBefore ? 'not yet valid' : now > cert.notAfter ? 'expired' : 'valid';
}

function inspectReport(stamp: Stamp, format: string, file: string, showSecrets: boolean) {
  const cert = parseCertificate(stamp.certificateDer);
  const chain = stamp.chainDer.map((der) => parseCertificate(der));
  const chainCheck = checkChain(cert, chain);
  const now = new Date();
  const deviceKey = stamp.devicePrivateKeyPkcs8 ? createPrivateKey({ key: stamp.devicePrivateKeyPkcs8, format: 'der', type: 'pkcs8' }) : undefined;
  const certKey = createPublicKey({ key: cert.subjectPublicKeyInfo, format: 'der', type: 'spki' });
  const report = {
    file,
    format,
    serialNumber: stamp.serialNumber,
    udid: stamp.udid,
    company: stamp.company,
    product: stamp.product,
    batch: stamp.batch,
    certificate: {
      subject: nameToString(cert.subject),
      issuer: nameToString(cert.issuer),
      serial: cert.serialHex,
      notBefore: cert.notBefore.toISOString(),
      notAfter: cert.notAfter.toISOString(),
      validity: validity(cert, now),
      publicKey: describeKey(certKey),
      sha256: sha256Fingerprint(cert.der),
    },
    chain: chain.map((c) => ({ subject: nameToString(c.subject), notAfter: c.notAfter.toISOString(), validity: validity(c, now), sha256: sha256Fingerprint(c.der) })),
    chainVerifies: true,
    rootSelfSigned: chainCheck.rootSelfSigned,
    devicePrivateKey: deviceKey ? { present: true, algorithm: describeKey(deviceKey), matchesCertificate: true } : { present: false },
    onboardingKey: {
      algorithm: 'X25519',
      publicKeySha256: createHash('sha256').update(stamp.onboardingPublicKeySpki).digest('hex'),
      privateKeyPresent: stamp.onboardingPrivateKeyPkcs8 !== undefined,
    },
    popSecretBytes: stamp.popSecret.length,
    ...(showSecrets ? {
      secrets: {
        popSecret: stamp.popSecret.toString('hex'),
        qrPayload: stamp.qrPayload,
        ...(stamp.devicePrivateKeyPkcs8 ? { devicePrivateKey: encodePem('PRIVATE KEY', stamp.devicePrivateKeyPkcs8) } : {}),
        ...(stamp.onboardingPrivateKeyPkcs8 ? { onboardingPrivateKey: encodePem('PRIVATE KEY', stamp.onboardingPrivateKeyPkcs8) } : {}),
      },
    } : {}),
  };
  return report;
}

function renderInspect(r: ReturnType<typeof inspectReport>): string {
  const lines = [`${r.file}: a good ${r.format} stamp`];
  const row = (name: string, value: string) => lines.push(`  ${name.padEnd(16)} ${value}`);
  row('serial number', r.serialNumber);
  row('UDID', r.udid);
  row('company', r.company);
  row('product', r.product);
  row('batch', r.batch);
  row('certificate', r.certificate.subject);
  row('  issuer', r.certificate.issuer);
  row('  serial', r.certificate.serial);
  row('  valid', `${r.certificate.notBefore} to ${r.certificate.notAfter} (${r.certificate.validity === 'valid' ? 'valid now' : r.certificate.validity.toUpperCase()})`);
  row('  key', r.certificate.publicKey);
  row('  sha256', r.certificate.sha256);
  if (r.chain.length === 0) row('chain', '(none: the device gets its issuer elsewhere)');
  r.chain.forEach((c, i) => row(i === 0 ? 'chain' : '', `${i + 1}. ${c.subject}${i === r.chain.length - 1 && r.rootSelfSigned ? ' (self-signed root)' : ''}${c.validity === 'valid' ? '' : ` (${c.validity.toUpperCase()})`}`));
  if (r.chain.length) row('', 'each certificate is signed by the next');
  row('device key', r.devicePrivateKey.present ? `present (${r.devicePrivateKey.algorithm}), matches the certificate` : 'absent (the device makes its own key)');
  row('onboarding key', `X25519, public key sha256 ${r.onboardingKey.publicKeySha256}; private key ${r.onboardingKey.privateKeyPresent ? 'present' : 'absent'}`);
  if (r.secrets) {
    row('PoP secret', r.secrets.popSecret);
    row('QR payload', r.secrets.qrPayload);
    if (r.secrets.devicePrivateKey) lines.push('  device private key:', r.secrets.devicePrivateKey.trimEnd());
    if (r.secrets.onboardingPrivateKey) lines.push('  onboarding private key:', r.secrets.onboardingPrivateKey.trimEnd());
  } else {
    row('PoP secret', `${r.popSecretBytes} bytes (hidden; --show-secrets prints it)`);
    row('QR payload', 'matches the PoP secret and onboarding key (hidden: it carries the PoP secret)');
  }
  return lines.join('\n');
}

export const stampInspectCommand: Command = {
  name: 'stamp inspect',
  summary: 'decode and check one stamp file (json, tlv or nvs); secrets hidden unless --show-secrets',
  usage: INSPECT_USAGE,
  allowPositionals: true,
  options: { format: { type: 'string' }, json: { type: 'boolean' }, 'show-secrets': { type: 'boolean' } },
  async run(args) {
    if (args.positionals.length !== 1) throw new HallmarkError('BAD_REQUEST', `give one stamp FILE\n\n${INSPECT_USAGE}`);
    const file = args.positionals[0]!;
    const data = await readInput(file, 'stamp file', MAX_TLV_INPUT_BYTES);
    const name = str(args, 'format');
    const format = name ? formatByName(name) : sniffFormat(data);
    const stamp = format.decode(data);
    const report = inspectReport(stamp, format.name, file, flag(args, 'show-secrets'));
    out(flag(args, 'json') ? JSON.stringify(report, null, 2) : renderInspect(report));
    if (report.certificate.validity !== 'valid') info(`warning: the certificate is ${report.certificate.validity} (${report.certificate.notBefore} to ${report.certificate.notAfter})`);
    return 0;
  },
};

// ---------------------------------------------------------------- factory key

/**
 * scrypt cost for the factory key file: N = 2^14, r = 8, p = 5 is one of OWASP's equivalent scrypt
 * settings to N = 2^17, p = 1 and needs 16 MiB, inside OpenSSL's 32 MiB default limit for scrypt in
 * PBES2 (so `openssl pkey -in factory.key` opens it too, which N = 2^17 would not).
 */
const FACTORY_SCRYPT = { N: 1 << 14, r: 8, p: 5 } as const;

const OID_PBES2 = '1.2.840.113549.1.5.13';
const OID_SCRYPT = '1.3.6.1.4.1.11591.4.11';
const OID_AES256_CBC = '2.16.840.1.101.3.4.1.42';

function scryptAsync(passphrase: string, salt: Buffer, options: { N: number; r: number; p: number }): Promise<Buffer> {
  return new Promise((resolveKey, reject) => scrypt(passphrase, salt, 32, { ...options, maxmem: 64 * 1024 * 1024 }, (err, key) => (err ? reject(err) : resolveKey(key))));
}

/**
 * An EncryptedPrivateKeyInfo (RFC 5958) with PBES2 (RFC 8018): scrypt (RFC 7914 §7) and AES-256-CBC,
 * as `openssl pkcs8 -topk8 -scrypt` writes it. Node's own export({ cipher, passphrase }) would use
 * PBKDF2 with OpenSSL's default 2048 iterations, too cheap for a key that may sit on a factory PC.
 */
export async function encryptPkcs8(pkcs8Der: Buffer, passphrase: string): Promise<string> {
  const salt = randomBytes(16);
  const iv = randomBytes(16);
  const key = await scryptAsync(passphrase, salt, FACTORY_SCRYPT);
  const cipher = createCipheriv('aes-256-cbc', key, iv);
  const encrypted = Buffer.concat([cipher.update(pkcs8Der), cipher.final()]);
  key.fill(0);
  const algorithm = seq(oid(OID_PBES2), seq(
    seq(oid(OID_SCRYPT), seq(octetString(salt), smallInteger(FACTORY_SCRYPT.N), smallInteger(FACTORY_SCRYPT.r), smallInteger(FACTORY_SCRYPT.p), smallInteger(32))),
    seq(oid(OID_AES256_CBC), octetString(iv)),
  ));
  return encodePem('ENCRYPTED PRIVATE KEY', seq(algorithm, octetString(encrypted)));
}

/** Reads the factory's encrypted key file; only an ENCRYPTED PRIVATE KEY is accepted. */
export async function readFactoryKey(args: ParsedArgs, file: string): Promise<KeyObject> {
  const text = (await readInput(file, 'factory key', MAX_KEY_FILE)).toString('utf8');
  let blocks;
  try { blocks = decodePemBlocks(text, MAX_KEY_FILE); } catch (err) { throw new HallmarkError('BAD_PEM', `${file} is not a PEM key file (${(err as Error).message})`, { cause: err }); }
  if (blocks.length !== 1 || blocks[0]!.label !== 'ENCRYPTED PRIVATE KEY') {
    throw new HallmarkError('BAD_PEM', `${file} must hold one ENCRYPTED PRIVATE KEY (the factory.key that hallmark stamp factory-key writes); unencrypted keys are refused`);
  }
  const passphrase = await readPassphrase(args, { envVar: FACTORY_PASSPHRASE_ENV, prompt: 'Factory key passphrase: ' });
  try {
    return createPrivateKey({ key: text, format: 'pem', passphrase });
  } catch (err) {
    throw new HallmarkError('BAD_PASSPHRASE', `the passphrase does not open ${file} (or the file is damaged)`, { cause: err });
  }
}

const FACTORY_KEY_USAGE = `Usage: hallmark stamp factory-key --out DIR [--passphrase-file F]

Makes the factory's key pair for encrypted stamp archives (EC P-256, the HPKE recipient key):
  DIR/factory.pem  the public key (SubjectPublicKeyInfo PEM): give it to the OEM, who runs
                   hallmark stamp generate ... --encrypt-to factory.pem
  DIR/factory.key  the private key, PKCS#8 encrypted with the passphrase (scrypt + AES-256-CBC);
                   it never touches the disk unencrypted. Keep it and its passphrase at the factory.
The passphrase comes from --passphrase-file, ${FACTORY_PASSPHRASE_ENV} (or HALLMARK_PASSPHRASE), or a
prompt; it must be at least 12 characters. Existing files are never overwritten.`;

export const stampFactoryKeyCommand: Command = {
  name: 'stamp factory-key',
  summary: 'make the factory\'s key pair for encrypted stamp archives (factory.pem to give, factory.key to keep)',
  usage: FACTORY_KEY_USAGE,
  options: { out: { type: 'string' }, 'passphrase-file': { type: 'string' } },
  async run(args) {
    const dir = resolve(required(args, 'out', FACTORY_KEY_USAGE));
    const keyPath = join(dir, 'factory.key');
    const pubPath = join(dir, 'factory.pem');
    for (const p of [keyPath, pubPath]) {
      if (await stat(p).then(() => true, () => false)) throw new HallmarkError('BAD_REQUEST', `${p} exists: a factory key is never overwritten (choose another --out)`);
    }
    const passphrase = await readPassphrase(args, { envVar: FACTORY_PASSPHRASE_ENV, prompt: 'New factory key passphrase: ', confirm: true });
    if (passphrase.length < 12) throw new HallmarkError('BAD_REQUEST', 'the factory key passphrase must be at least 12 characters');
    const { privateKey, publicKey } = generateKeyPairSync('ec', { namedCurve: 'prime256v1' });
    const encrypted = await encryptPkcs8(privateKey.export({ type: 'pkcs8', format: 'der' }), passphrase);
    const spki = publicKey.export({ type: 'spki', format: 'der' });
    await mkdir(dir, { recursive: true, mode: 0o700 });
    // 'wx': never replace a key someone made in the meantime; the public key only once the private one is safe.
    await writeFile(keyPath, encrypted, { mode: 0o600, flag: 'wx' });
    try {
      await writeFile(pubPath, encodePem('PUBLIC KEY', spki), { mode: 0o644, flag: 'wx' });
    } catch (err) {
      await rm(keyPath, { force: true });
      throw err;
    }
    out(`Factory key made: sha256:${factoryKeyFingerprint(spki)}
  ${pubPath}  public key: give it to the OEM (hallmark stamp generate --encrypt-to factory.pem)
  ${keyPath}  private key, encrypted with the passphrase: keep it (and the passphrase) at the factory`);
    return 0;
  },
};

// ---------------------------------------------------------------- stamp open

const OPEN_USAGE = `Usage: hallmark stamp open ARCHIVE --key factory.key --trust ROOT.pem --out DIR [--passphrase-file F] [--json]

Verifies a stamp archive made by hallmark stamp generate --encrypt-to, then decrypts it into DIR.
The archive must be signed by a CA that chains to a root in --trust (PEM, one or more certificates;
--trust may be repeated), be valid now, be complete and unchanged, and be encrypted to factory.key
(opened with --passphrase-file, ${FACTORY_PASSPHRASE_ENV} or HALLMARK_PASSPHRASE). Nothing is written
unless all of that holds: the files go to a temporary directory beside DIR, renamed to DIR at the
end. DIR must not exist or be empty. Every file is written 0600 (stamps hold private keys).`;

async function readRoots(files: readonly string[]): Promise<Buffer[]> {
  const roots: Buffer[] = [];
  for (const file of files) {
    const data = await readInput(file, 'trust file', SIZE_LIMITS.chain * 2);
    if (data[0] === 0x30) { roots.push(data); continue; }
    let blocks;
    try { blocks = decodePemBlocks(data.toString('utf8'), SIZE_LIMITS.certificate); } catch (err) { throw new HallmarkError('BAD_PEM', `trust file ${file}: ${(err as Error).message}`, { cause: err }); }
    const certs = blocks.filter((b) => b.label === 'CERTIFICATE');
    if (certs.length === 0) throw new HallmarkError('BAD_PEM', `trust file ${file} holds no CERTIFICATE`);
    roots.push(...certs.map((b) => b.der));
  }
  return roots;
}

export const stampOpenCommand: Command = {
  name: 'stamp open',
  summary: 'verify and decrypt a stamp archive (--encrypt-to) into a directory; nothing written if it is bad',
  usage: OPEN_USAGE,
  allowPositionals: true,
  options: { key: { type: 'string' }, trust: { type: 'string', multiple: true }, out: { type: 'string' }, 'passphrase-file': { type: 'string' }, json: { type: 'boolean' } },
  async run(args) {
    if (args.positionals.length !== 1) throw new HallmarkError('BAD_REQUEST', `give one ARCHIVE\n\n${OPEN_USAGE}`);
    const archivePath = args.positionals[0]!;
    const keyFile = required(args, 'key', OPEN_USAGE);
    const trust = list(args, 'trust');
    if (trust.length === 0) throw new HallmarkError('BAD_REQUEST', `--trust ROOT.pem is required (the OEM's root certificate)\n\n${OPEN_USAGE}`);
    const outDir = resolve(required(args, 'out', OPEN_USAGE));
    let outExists = false;
    try {
      const s = await stat(outDir);
      if (!s.isDirectory()) throw new HallmarkError('BAD_REQUEST', `${outDir} exists and is not a directory`);
      if ((await readdir(outDir)).length > 0) throw new HallmarkError('BAD_REQUEST', `${outDir} is not empty: stamps are opened into a new or empty directory`);
      outExists = true;
    } catch (err) {
      if (err instanceof HallmarkError) throw err;
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw new HallmarkError('BAD_REQUEST', `cannot use ${outDir}: ${(err as NodeJS.ErrnoException).code}`);
    }
    const trustedRoots = await readRoots(trust);
    const recipientPrivateKey = await readFactoryKey(args, keyFile);
    try { await stat(archivePath); } catch (err) { throw new HallmarkError('BAD_REQUEST', `cannot read archive ${archivePath}: ${(err as NodeJS.ErrnoException).code}`); }

    const archive = openArchive({ path: archivePath, recipientPrivateKey, trustedRoots });
    const summary = await archive.verify();

    const tmp = join(dirname(outDir), `.${basename(outDir)}.partial-${randomBytes(6).toString('hex')}`);
    await mkdir(dirname(outDir), { recursive: true });
    await mkdir(tmp, { mode: 0o700 });
    const counts = new Map<string, number>();
    let files = 0;
    let bytes = 0;
    try {
      for await (const entry of archive) {
        // 'wx': a name twice in one archive is an error, not a silent overwrite. No fsync per file (a
        // batch is 100,000 of them): after a crash the archive is still there to be opened again.
        const fh = await open(join(tmp, entry.name), 'wx', 0o600);
        try { await fh.writeFile(entry.data); } finally { await fh.close(); }
        const format = STAMP_FORMATS.find((f) => entry.name.endsWith(f.extension));
        const kind = format?.name ?? 'other';
        counts.set(kind, (counts.get(kind) ?? 0) + 1);
        files++;
        bytes += entry.data.length;
      }
      if (outExists) await rmdir(outDir);
      await rename(tmp, outDir);
    } catch (err) {
      await rm(tmp, { recursive: true, force: true });
      if ((err as NodeJS.ErrnoException).code === 'EEXIST') throw new HallmarkError('STAMP_ARCHIVE_INVALID', 'stamp archive holds the same file name twice', { cause: err });
      throw err;
    }
    const byFormat = [...STAMP_FORMAT_NAMES, 'other'].filter((k) => counts.has(k)).map((k) => `${counts.get(k)} ${k}`).join(', ');
    if (flag(args, 'json')) {
      out(JSON.stringify({ archive: archivePath, out: outDir, files, dataBytes: bytes, byFormat: Object.fromEntries(counts), ...summary }, null, 2));
    } else {
      out(`Opened ${archivePath} into ${outDir}: ${files} files (${byFormat || 'none'}), ${bytes} bytes
  signed by  ${summary.signerSubject} (certificate sha256 ${summary.signerFingerprintSha256})
  chains to  ${summary.rootSubject}
  made for   factory key sha256:${summary.recipientKeySha256}
  archive    sha256 ${summary.sha256}${summary.info ? `\n  info       ${Object.entries(summary.info).map(([k, v]) => `${k}=${typeof v === 'string' ? v : JSON.stringify(v)}`).join(', ')}` : ''}`);
    }
    return 0;
  },
};
