import { HallmarkError } from '../../errors.js';
import { defaultRootDir, resolveHome } from '../../authority/home.js';
import { initAuthority } from '../../authority/init.js';
import { actor, info, list, out, readPassphrase, required, str, type Command } from '../io.js';

export const initCommand: Command = {
  name: 'init',
  summary: 'create an authority: offline root, issuing CA, OCSP signer, TLS server certificate',
  usage: `Usage: hallmark init --org NAME [--home DIR] [--root-dir DIR] [--key-backend file|pkcs11]
                     [--key-algorithm ecdsa-p256|ecdsa-p384|ed25519|rsa-2048|rsa-3072]
                     [--pkcs11-module PATH --pkcs11-token LABEL [--root-pkcs11-token LABEL]]
                     [--passphrase-file FILE] [--root-passphrase-file FILE] [--dns NAME]... [--ip ADDR]...
                     [--public-url http://pki.example.com:8080]

Creates a self-signed root CA whose key is kept in a separate root directory (default: hallmark-root
beside the home; carry it offline) or a PKCS#11 token, an issuing intermediate CA "issuing-1" signed
by it, a delegated OCSP signing certificate, and a TLS server certificate for "hallmark serve".

The passphrase protecting the key stores comes from --passphrase-file, HALLMARK_PASSPHRASE, or a
terminal prompt. The root directory uses --root-passphrase-file / HALLMARK_ROOT_PASSPHRASE when given.
With --key-backend pkcs11 the PIN is HALLMARK_PKCS11_PIN (or the passphrase); the root token may
have its own PIN in HALLMARK_ROOT_PKCS11_PIN.
--public-url: where devices and services reach the public listener (hallmark serve --http-port);
issued device and TLS certificates then point there for CRLs (/crl/CA.crl) and OCSP (/ocsp).
--home defaults to HALLMARK_HOME, then ./hallmark-data.`,
  options: {
    org: { type: 'string' },
    'root-dir': { type: 'string' },
    'key-backend': { type: 'string' },
    'key-algorithm': { type: 'string' },
    'pkcs11-module': { type: 'string' },
    'pkcs11-token': { type: 'string' },
    'root-pkcs11-token': { type: 'string' },
    'passphrase-file': { type: 'string' },
    'root-passphrase-file': { type: 'string' },
    dns: { type: 'string', multiple: true },
    ip: { type: 'string', multiple: true },
    'public-url': { type: 'string' },
  },
  async run(args) {
    const home = resolveHome(str(args, 'home'));
    const org = required(args, 'org', this.usage);
    const backend = str(args, 'key-backend') ?? 'file';
    if (backend !== 'file' && backend !== 'pkcs11') throw new HallmarkError('BAD_REQUEST', `--key-backend must be file or pkcs11, not ${backend}`);
    const passphrase = await readPassphrase(args, { prompt: 'New passphrase for the authority key store: ', confirm: true });
    const rootPassphrase = str(args, 'root-passphrase-file') || process.env.HALLMARK_ROOT_PASSPHRASE
      ? await readPassphrase(args, { fileOption: 'root-passphrase-file', envVar: 'HALLMARK_ROOT_PASSPHRASE' })
      : undefined;
    const rootDir = str(args, 'root-dir') ?? defaultRootDir(home);
    const result = await initAuthority({
      home, rootDir, org, passphrase, rootPassphrase,
      keyBackend: backend,
      pkcs11: backend === 'pkcs11' ? { module: required(args, 'pkcs11-module', this.usage), token: required(args, 'pkcs11-token', this.usage) } : undefined,
      rootPkcs11Token: str(args, 'root-pkcs11-token'),
      algorithm: str(args, 'key-algorithm'),
      tlsDnsNames: list(args, 'dns'),
      tlsIpAddresses: list(args, 'ip'),
      publicUrl: str(args, 'public-url'),
      actor: actor(),
    });
    out(`Initialised authority for ${org}
  home:        ${result.home}
  root:        ${result.rootSubject}
  root dir:    ${result.rootDir}   <- holds the root key: move it offline
  issuing CA:  ${result.issuingCa}`);
    info('Next: hallmark serve, or hallmark ca list');
    return 0;
  },
};
