// The package as a `deno add` user gets it: the files `deno publish` ships (its dry run's list),
// copied into a temporary folder, imported from a fresh Deno project through an import map, with
// no `build/` and no ALPHA_MOE_LIB. The library must be built into the cache on first use (once,
// even by two processes at once), loaded from it afterwards without a build, and rebuilt when the
// entry is corrupted; the same through a remote (http) import, which has no files to read.
//
// The end-to-end tests compile the CUDA library twice (20-40 s each on a small machine) and are
// ignored where there is no nvcc; the cache, lock and manifest tests run everywhere.
import assert from "node:assert/strict";
import { fileURLToPath, pathToFileURL } from "node:url";
import { findNvcc, LIBRARY_NAME, TARGET_ARCH } from "../ffi/build.ts";
import { ABI_VERSION } from "../ffi/library.ts";
import {
  acquireLock,
  type CacheEntry,
  cacheEntry,
  cacheKey,
  type CacheStamp,
  findCompatibleEntry,
  PACKAGE_VERSION,
  processAlive,
  sha256File,
  sourceHash,
  STAMP_NAME,
  validateEntry,
} from "../ffi/cache.ts";
import { CUDA_SOURCES } from "../ffi/sources.ts";
import { listRepositorySources, sourceManifest } from "../tasks/nvcc.ts";

const ROOT = fileURLToPath(new URL("..", import.meta.url)).replace(/\/$/, "");
const hasNvcc = ((): boolean => {
  try {
    findNvcc();
    return true;
  } catch {
    return false;
  }
})();

/** A user's permissions for a package that may build on first use. */
const PERMISSIONS = ["--allow-read", "--allow-write", "--allow-run", "--allow-env", "--allow-ffi"];
const decoder = new TextDecoder();

interface Run {
  code: number;
  stdout: string;
  stderr: string;
}

/** `deno <args>` in `cwd`, with the environment minus ALPHA_MOE_* plus `env`. */
async function deno(args: string[], cwd: string, env: Record<string, string> = {}): Promise<Run> {
  const base = Deno.env.toObject();
  for (const name of Object.keys(base)) if (name.startsWith("ALPHA_MOE_")) delete base[name];
  const { code, stdout, stderr } = await new Deno.Command(Deno.execPath(), {
    args,
    cwd,
    clearEnv: true,
    env: { ...base, NO_COLOR: "1", DENO_NO_UPDATE_CHECK: "1", ...env },
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).output();
  return { code, stdout: decoder.decode(stdout), stderr: decoder.decode(stderr) };
}

let published: Promise<string[]> | undefined;

/** The files `deno publish` would ship, relative to the repository (its dry run's list). */
function publishedFiles(): Promise<string[]> {
  published ??= (async () => {
    // Slow types are another check's business; this one is about the file list.
    const run = await deno(["publish", "--dry-run", "--allow-dirty", "--allow-slow-types"], ROOT);
    assert.equal(run.code, 0, `deno publish --dry-run failed:\n${run.stdout}${run.stderr}`);
    const prefix = `${pathToFileURL(ROOT).href}/`;
    const files = [...`${run.stdout}\n${run.stderr}`.matchAll(/(file:\/\/\S+) \(/g)]
      .map((m) => m[1])
      .filter((url) => url.startsWith(prefix))
      .map((url) => decodeURIComponent(url.slice(prefix.length)));
    assert.ok(files.length > 0, `no files in the dry run's output:\n${run.stdout}${run.stderr}`);
    return files.sort();
  })();
  return published;
}

/** A temporary folder with the published package in `pkg/` and a user project in `app/`. */
async function makeProject(): Promise<{ dir: string; pkg: string; app: string }> {
  const dir = await Deno.makeTempDir({ prefix: "amoe_install_" });
  const pkg = `${dir}/pkg`;
  for (const rel of await publishedFiles()) {
    const to = `${pkg}/${rel}`;
    await Deno.mkdir(to.slice(0, to.lastIndexOf("/")), { recursive: true });
    await Deno.copyFile(`${ROOT}/${rel}`, to);
  }
  const app = await makeApp(dir, "app", pathToFileURL(`${pkg}/mod.ts`).href);
  return { dir, pkg, app };
}

/** A fresh project `dir/name` whose import map points "@alpha-moe/alpha-moe" at `modUrl`. */
async function makeApp(dir: string, name: string, modUrl: string): Promise<string> {
  const app = `${dir}/${name}`;
  await Deno.mkdir(app);
  await Deno.writeTextFile(
    `${app}/deno.json`,
    JSON.stringify({ imports: { "@alpha-moe/alpha-moe": modUrl } }, null, 2),
  );
  // What a user writes: import the package, use the library. Options come as JSON in argv.
  await Deno.writeTextFile(
    `${app}/main.ts`,
    `import { deviceCount, LibraryLoadError, openLibrary } from "@alpha-moe/alpha-moe";
const options = JSON.parse(Deno.args[0] ?? "{}");
const started = performance.now();
try {
  const lib = openLibrary(options);
  const ms = performance.now() - started;
  console.log(JSON.stringify({ abi: lib.symbols.amoe_abi_version(), devices: deviceCount(), ms }));
} catch (err) {
  if (!(err instanceof LibraryLoadError)) throw err;
  console.log(err.message);
  Deno.exit(3);
}
`,
  );
  return app;
}

function loaded(run: Run): { abi: number; devices: number; ms: number } {
  assert.equal(run.code, 0, `exit ${run.code}\n${run.stdout}\n${run.stderr}`);
  const line = run.stdout.trim().split("\n").at(-1)!;
  const answer = JSON.parse(line);
  assert.equal(answer.abi, ABI_VERSION, line);
  assert.ok(answer.devices >= 0, line);
  return answer;
}

const BUILD_LINE = new RegExp(
  `^alpha-moe: (re)?building ${LIBRARY_NAME.replace(".", "\\.")} for ${TARGET_ARCH} with CUDA ` +
    `[\\d.]+ \\(.+\\) into .+ \\.\\.\\. done in [\\d.]+ s$`,
  "gm",
);

function buildLines(text: string): string[] {
  return text.match(BUILD_LINE) ?? [];
}

/** The cache entries under `cache` (directories of this version). */
function entries(cache: string): string[] {
  try {
    return [...Deno.readDirSync(`${cache}/${PACKAGE_VERSION}`)].map((e) => e.name).sort();
  } catch {
    return [];
  }
}

Deno.test("ffi/sources.ts imports every file under cuda/ (run `deno task build` to update it)", async () => {
  const files = await listRepositorySources();
  assert.deepEqual(Object.keys(CUDA_SOURCES), files);
  const text = await Deno.readTextFile(`${ROOT}/ffi/sources.ts`);
  assert.equal(text, sourceManifest(files), "ffi/sources.ts is not what `deno task build` writes");
  for (const rel of files) {
    assert.equal(CUDA_SOURCES[rel], await Deno.readTextFile(`${ROOT}/cuda/${rel}`), rel);
  }
});

Deno.test("deno publish ships the code, the CUDA sources and the docs, and nothing else", async () => {
  const files = await publishedFiles();
  for (const needed of ["mod.ts", "deno.json", "README.md", "LICENSE", "ffi/library.ts"]) {
    assert.ok(files.includes(needed), `${needed} is not published`);
  }
  for (const rel of Object.keys(CUDA_SOURCES)) {
    assert.ok(files.includes(`cuda/${rel}`), `cuda/${rel} is not published`);
  }
  const unwanted = files.filter((f) =>
    /^(build|\.device|\.ci|\.scratch|tests|bench|tasks|node_modules)\//.test(f) ||
    /\.(so|o|stamp|safetensors)$/.test(f) || f === "deno.lock"
  );
  assert.deepEqual(unwanted, []);
});

Deno.test({
  name: "installed without nvcc and nothing built: the error names every place and what to do",
  sanitizeResources: false,
  async fn(): Promise<void> {
    const { dir, app } = await makeProject();
    try {
      const nowhere = {
        cacheDir: `${dir}/cache`,
        nvccSearch: {
          path: `${dir}/no-bin`,
          cudaHome: `${dir}/no-cuda`,
          fallbackDir: `${dir}/no-fallback/bin`,
        },
      };
      const run = await deno(["run", ...PERMISSIONS, "main.ts", JSON.stringify(nowhere)], app);
      assert.equal(run.code, 3, `${run.stdout}\n${run.stderr}`);
      const text = run.stdout;
      assert.match(text, /pkg\/build\/libalpha_moe\.so \(default build output\): not found/);
      assert.match(text, /cache\/0\.\d+\.\d+.*\/ \(cache\): no library built/);
      assert.match(text, /nvcc \(the CUDA compiler\) was not found/);
      assert.ok(text.includes(`PATH (${dir}/no-bin)`), text);
      assert.ok(text.includes(`${dir}/no-cuda/bin/nvcc (from CUDA_HOME)`), text);
      assert.ok(text.includes(`${dir}/no-fallback/bin/nvcc`), text);
      for (const word of ["ALPHA_MOE_LIB", "ALPHA_MOE_CACHE", "CUDA_HOME", "CUDA toolkit 12.8"]) {
        assert.ok(text.includes(word), `${word} is not in:\n${text}`);
      }
      assert.match(text, /--allow-run/);
      assert.deepEqual(entries(`${dir}/cache`), [], "nothing is written without nvcc");
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test({
  name: "a fresh project: first use builds into the cache once, later uses load it, a corrupted " +
    "entry is rebuilt (also from a remote import)",
  ignore: !hasNvcc,
  sanitizeResources: false,
  sanitizeOps: false,
  async fn(t): Promise<void> {
    const { dir, pkg, app } = await makeProject();
    const cache = `${dir}/cache`;
    const env = { ALPHA_MOE_CACHE: cache };
    const main = ["run", ...PERMISSIONS, "main.ts"];
    try {
      await t.step("two processes at once: one builds, the other waits, both load", async () => {
        const [a, b] = await Promise.all([deno(main, app, env), deno(main, app, env)]);
        loaded(a);
        loaded(b);
        const lines = [...buildLines(a.stderr), ...buildLines(b.stderr)];
        assert.equal(lines.length, 1, `one build expected:\n${a.stderr}\n---\n${b.stderr}`);
        assert.match(lines[0], /^alpha-moe: building .* \(first use of alpha-moe /);
        // Nothing but the one line (and the other's "waiting" line) on stderr.
        for (const line of `${a.stderr}${b.stderr}`.split("\n").filter((l) => l !== "")) {
          assert.match(line, /^alpha-moe: (building|waiting for another process)/, line);
        }
        const names = entries(cache);
        assert.equal(names.length, 1, `one entry, no lock or temporary left: ${names}`);
        assert.match(names[0], new RegExp(`^${TARGET_ARCH}-cuda\\d+\\.\\d+-[0-9a-f]{16}$`));
        const entryDir = `${cache}/${PACKAGE_VERSION}/${names[0]}`;
        assert.deepEqual([...Deno.readDirSync(entryDir)].map((e) => e.name).sort(), [
          LIBRARY_NAME,
          STAMP_NAME,
        ]);
        const stamp: CacheStamp = JSON.parse(await Deno.readTextFile(`${entryDir}/${STAMP_NAME}`));
        assert.equal(stamp.sourceHash, sourceHash(), "the key hashes the packaged sources");
        assert.equal(stamp.packageVersion, PACKAGE_VERSION);
        assert.equal(stamp.arch, TARGET_ARCH);
      });

      await t.step("second use: loaded from the cache, no build, fast", async () => {
        const run = await deno(main, app, env);
        const answer = loaded(run);
        assert.equal(run.stderr, "", "no build line");
        assert.ok(answer.ms < 3000, `openLibrary took ${answer.ms} ms`);
      });

      await t.step(
        "a corrupted entry is rebuilt, here through a remote (http) import",
        async () => {
          const [name] = entries(cache);
          const library = `${cache}/${PACKAGE_VERSION}/${name}/${LIBRARY_NAME}`;
          const bytes = await Deno.readFile(library);
          bytes.fill(0x5a, bytes.length >> 1, (bytes.length >> 1) + 4096);
          await Deno.writeFile(library, bytes);

          // Serve the published files over http: a remote package has no files to read or build/.
          const types: Record<string, string> = {
            ts: "application/typescript",
            json: "application/json",
            md: "text/markdown",
          };
          const server = Deno.serve(
            { hostname: "127.0.0.1", port: 0, onListen(): void {} },
            async (req) => {
              const path = decodeURIComponent(new URL(req.url).pathname);
              try {
                const body = await Deno.readFile(`${pkg}${path}`);
                const ext = path.slice(path.lastIndexOf(".") + 1);
                const type = types[ext] ?? "application/octet-stream";
                return new Response(body, { headers: { "content-type": type } });
              } catch {
                return new Response("not found", { status: 404 });
              }
            },
          );
          try {
            const host = `127.0.0.1:${server.addr.port}`;
            const remote = await makeApp(dir, "remote-app", `http://${host}/mod.ts`);
            const run = await deno(
              ["run", ...PERMISSIONS, `--allow-import=${host}`, "main.ts"],
              remote,
              { ...env, DENO_DIR: `${dir}/deno_dir` },
            );
            loaded(run);
            const lines = buildLines(run.stderr);
            assert.equal(lines.length, 1, run.stderr);
            assert.match(lines[0], /^alpha-moe: rebuilding .*\(corrupted: /);
          } finally {
            await server.shutdown();
          }
          assert.deepEqual(entries(cache), [name], "rebuilt in place");
          const again = await deno(main, app, env);
          loaded(again);
          assert.equal(again.stderr, "", "the rebuilt entry is loaded as it is");
        },
      );
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});

// ---- the cache entry checks and the lock, without nvcc ----

/** A fake entry (the "library" is text) with a valid stamp. */
async function fakeEntry(root: string, nvccText: string): Promise<CacheEntry> {
  const entry = cacheEntry(root, cacheKey({ text: nvccText, major: 12, minor: 9 }));
  await Deno.mkdir(entry.dir, { recursive: true });
  await Deno.writeTextFile(entry.library, "not really a library");
  const stamp: CacheStamp = {
    ...entry.key,
    librarySha256: sha256File(entry.library),
    builtAt: new Date().toISOString(),
    nvcc: "/fake/nvcc",
    seconds: 1,
  };
  await Deno.writeTextFile(entry.stamp, JSON.stringify(stamp));
  return entry;
}

Deno.test("cache entries: stale, garbled, corrupted or missing ones are refused", async () => {
  const root = await Deno.makeTempDir({ prefix: "amoe_cache_" });
  try {
    const entry = await fakeEntry(root, "Cuda compilation tools, release 12.9, V12.9.1");
    assert.equal(validateEntry(entry), undefined);
    assert.ok(entry.dir.startsWith(`${root}/${PACKAGE_VERSION}/${TARGET_ARCH}-cuda12.9-`));

    // Other sources, another nvcc: another entry.
    const otherSources = { ...CUDA_SOURCES, "status.cuh": `${CUDA_SOURCES["status.cuh"]}\n` };
    const other = cacheEntry(root, cacheKey({ text: "x", major: 12, minor: 9 }, otherSources));
    assert.notEqual(other.dir, entry.dir);
    assert.notEqual(sourceHash(otherSources), sourceHash());
    assert.equal(validateEntry(other), "not built yet");
    assert.notEqual(
      cacheEntry(root, cacheKey({ text: "release 13.0", major: 13, minor: 0 })).dir,
      entry.dir,
    );

    const good = await Deno.readTextFile(entry.stamp);
    const stamp = JSON.parse(good);
    await Deno.writeTextFile(entry.stamp, JSON.stringify({ ...stamp, sourceHash: "0".repeat(64) }));
    assert.equal(validateEntry(entry), "stale: built from another source hash");
    await Deno.writeTextFile(entry.stamp, good.slice(0, 40));
    assert.equal(validateEntry(entry), "stamp garbled");
    await Deno.writeTextFile(entry.stamp, good);
    await Deno.writeTextFile(entry.library, "not really a library!");
    assert.match(validateEntry(entry)!, /^corrupted/);
    await Deno.remove(entry.library);
    assert.equal(validateEntry(entry), "library missing");
    await Deno.remove(entry.stamp);
    assert.equal(validateEntry(entry), "not built yet");

    // Without nvcc, any valid entry built from these sources is found (the newest).
    assert.equal(findCompatibleEntry(root), undefined);
    const a = await fakeEntry(root, "release 12.9 (a)");
    await new Promise((r) => setTimeout(r, 5));
    const b = await fakeEntry(root, "release 12.9 (b)");
    assert.equal(findCompatibleEntry(root)?.dir, b.dir);
    await Deno.writeTextFile(b.library, "garbled");
    assert.equal(findCompatibleEntry(root)?.dir, a.dir);
    assert.equal(findCompatibleEntry(root, otherSources), undefined);
  } finally {
    await Deno.remove(root, { recursive: true });
  }
});

Deno.test("the build lock: waits for a live holder, takes over a dead or an old one", async () => {
  const dir = await Deno.makeTempDir({ prefix: "amoe_lock_" });
  try {
    const lock = `${dir}/entry.lock`;
    const release = acquireLock(lock);
    const held = JSON.parse(await Deno.readTextFile(lock));
    assert.equal(held.pid, Deno.pid);

    // Held by a live process (this one): wait, tell once, give up at the timeout.
    let told = 0;
    assert.throws(
      () => acquireLock(lock, { timeoutMs: 300, pollMs: 50, onWait: () => told++ }),
      /timed out after 300 ms waiting for the lock .* \(held by process \d+\)/,
    );
    assert.equal(told, 1);
    release();
    await assert.rejects(Deno.stat(lock), Deno.errors.NotFound);

    // Whether a holder runs: this process does, an exited one and an impossible pid do not.
    assert.equal(processAlive(Deno.pid), true);
    assert.equal(processAlive(2 ** 22 + 1), false, "no pid exceeds 2^22, Linux's limit");
    const child = new Deno.Command("true").spawn();
    await child.status;
    assert.equal(processAlive(child.pid), false);

    // Held by a process that is gone: taken over at once.
    await Deno.writeTextFile(lock, JSON.stringify({ pid: 2 ** 22 + 1, startedAt: Date.now() }));
    const started = Date.now();
    const release2 = acquireLock(lock, { timeoutMs: 5000, onWait: () => assert.fail("waited") });
    assert.ok(Date.now() - started < 1000);
    assert.equal(JSON.parse(await Deno.readTextFile(lock)).pid, Deno.pid);
    release2();

    // Older than staleMs (a hung builder): taken over too.
    await Deno.writeTextFile(lock, JSON.stringify({ pid: Deno.pid, startedAt: Date.now() - 1e6 }));
    acquireLock(lock, { staleMs: 1000, timeoutMs: 5000 })();

    // Released by its holder meanwhile: a lock that is not ours is left alone.
    const release3 = acquireLock(lock);
    await Deno.writeTextFile(lock, JSON.stringify({ pid: 1, startedAt: Date.now() }));
    release3();
    assert.ok((await Deno.stat(lock)).isFile);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
