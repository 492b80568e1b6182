"""Every text the page shows, in English and Chinese: one table, one lookup.

Config keys and their help texts are not here: the form shows them from the config schema itself.
"""

from __future__ import annotations

LANGS = ("en", "zh")

# key -> (English, Chinese)
STRINGS: dict[str, tuple[str, str]] = {
    "title": ("chattune: fine-tune a chat model", "chattune：微调对话模型"),
    "lang": ("Language", "语言"),
    "tab.configure": ("Configure", "配置"),
    "tab.data": ("Data", "数据"),
    "tab.train": ("Train", "训练"),
    "tab.chat": ("Chat", "对话"),
    "tab.evaluate": ("Evaluate", "评测"),
    "tab.export": ("Export", "导出"),
    "tab.runs": ("Runs", "运行记录"),
    # Configure
    "cfg.preset": ("Recipe preset (configs/)", "预设配方（configs/）"),
    "cfg.load": ("Load preset", "载入预设"),
    "cfg.model": ("Model: packaged alias, local folder or hub id", "模型：内置别名、本地文件夹或 Hub ID"),
    "cfg.upload": ("Upload a data file", "上传数据文件"),
    "cfg.data_path": ("Data file path (training data)", "数据文件路径（训练数据）"),
    "cfg.use_path": ("Use this data file", "使用该数据文件"),
    "cfg.fields": ("All settings (from the config schema; `chattune keys` lists the same)",
                   "全部设置（来自配置结构，与 `chattune keys` 一致）"),
    "cfg.validate": ("Check settings", "检查设置"),
    "cfg.yaml": ("YAML as it would be saved", "将要保存的 YAML"),
    "cfg.command": ("The same run on the command line", "等价的命令行"),
    "cfg.download": ("Download YAML", "下载 YAML"),
    "cfg.ok": ("Settings are valid.", "设置有效。"),
    "cfg.problems": ("Problems (also shown next to each field)", "问题（也显示在对应字段旁）"),
    "cfg.none": ("(none: start from the defaults)", "（无：使用默认值）"),
    # Data
    "data.check": ("Check data", "检查数据"),
    "data.sample": ("Sample number", "样本编号"),
    "data.show": ("Show supervised tokens", "显示监督的 token"),
    "check.files": ("Data files", "数据文件"),
    "check.file": ("file", "文件"),
    "check.role": ("role", "用途"),
    "check.rows": ("rows", "行数"),
    "check.kept": ("kept", "保留"),
    "check.skipped": ("skipped", "跳过"),
    "check.error": ("error", "错误"),
    "check.skipped_rows": ("Skipped rows", "跳过的行"),
    "check.duplicates": ("Duplicates", "重复"),
    "check.conflicts": ("Same prompt, different answers", "相同提问、不同回答"),
    "check.none": ("none", "无"),
    "check.lengths": ("Tokens per sample (before max_length)", "每个样本的 token 数（截断前）"),
    "check.truncated": ("truncated", "被截断"),
    "check.lost_eot": ("lost the end-of-turn token", "丢失轮次结束符"),
    "check.dropped": ("dropped", "被丢弃"),
    "check.lost_tokens": ("supervised tokens lost", "丢失的监督 token"),
    "mask.supervised": ("supervised (learned)", "监督（被学习）"),
    "mask.eot": ("end-of-turn token", "轮次结束符"),
    "mask.ignored": ("ignored (prompt)", "忽略（提示部分）"),
    "mask.cut": ("cut by max_length", "被 max_length 截掉"),
    "mask.supervised_n": ("supervised", "个被监督"),
    # Train
    "train.run_dir": ("Run folder (output_dir)", "运行目录（output_dir）"),
    "train.start": ("Start / resume training", "开始 / 继续训练"),
    "train.stop": ("Stop (can be resumed)", "停止（可继续）"),
    "train.overwrite": ("Replace a finished run (--overwrite)", "覆盖已完成的运行（--overwrite）"),
    "train.idle": ("No training is running here.", "这里没有正在进行的训练。"),
    "train.running": ("running", "训练中"),
    "train.finished": ("finished", "已完成"),
    "train.stopped": ("stopped; start again to resume from the last checkpoint",
                      "已停止；再次开始即可从最近的检查点继续"),
    "train.died": ("the training process stopped with an error; start again to resume",
                   "训练进程出错退出；再次开始即可继续"),
    "train.started": ("started", "已启动"),
    "train.step": ("step", "步"),
    "train.eta": ("ETA", "预计剩余"),
    "train.tps": ("tokens/s", "token/秒"),
    "train.log": ("log", "日志"),
    # Chat
    "chat.run_dir": ("Run folder to chat with", "要对话的运行目录"),
    "chat.load": ("Load", "加载"),
    "chat.system": ("System prompt", "系统提示词"),
    "chat.max_new_tokens": ("Answer length limit (tokens)", "回答长度上限（token）"),
    "chat.message": ("Your message", "你的消息"),
    "chat.send": ("Send", "发送"),
    "chat.reset": ("Reset", "清空"),
    "chat.base": ("Base model", "基础模型"),
    "chat.tuned": ("Tuned model", "微调后模型"),
    "chat.loaded": ("loaded", "已加载"),
    "chat.stopped": ("stopped by itself", "自行结束"),
    "chat.cut": ("cut at the length limit (did not stop)", "达到长度上限被截断（未自行结束）"),
    # Evaluate
    "eval.data": ("Data file with reference answers (BLEU/ROUGE)", "带参考答案的数据文件（BLEU/ROUGE）"),
    "eval.mcq": ("Multiple-choice file", "选择题文件"),
    "eval.compare_base": ("Also score the base model", "同时评测基础模型"),
    "eval.limit": ("Only the first N rows (empty: all)", "只用前 N 行（空：全部）"),
    "eval.run": ("Evaluate", "开始评测"),
    "eval.results": ("Results", "结果"),
    # Export
    "export.merge": ("Merge the adapter into the base model", "把适配器合并进基础模型"),
    "export.out": ("Output folder", "输出文件夹"),
    "export.dtype": ("dtype of the merged weights", "合并后权重的数据类型"),
    "export.run": ("Merge", "合并"),
    "export.gguf": ("GGUF for llama.cpp / LM Studio, or Ollama — answers checked against llama.cpp",
                    "导出 GGUF（llama.cpp / LM Studio）或 Ollama——回答与 llama.cpp 逐条核对"),
    "export.to": ("Target", "目标"),
    "export.quant": ("Quantisation", "量化类型"),
    "export.overwrite": ("Replace an earlier export", "覆盖之前的导出"),
    "export.gguf_run": ("Export", "导出"),
    "job.running": ("running", "运行中"),
    "job.done": ("done", "完成"),
    "job.failed": ("failed", "失败"),
    # Runs
    "runs.folder": ("Folder holding runs", "存放运行的文件夹"),
    "runs.refresh": ("List runs", "列出运行"),
    "runs.pick": ("Runs to compare side by side", "并排比较的运行"),
    "runs.compare": ("Compare", "比较"),
    "runs.report": ("report", "报告"),
    "runs.none": ("no runs here", "这里没有运行"),
    # errors
    "err.unexpected": ("unexpected error", "意外错误"),
    "err.details": ("details in", "详情见"),
}


def t(key: str, lang: str = "en") -> str:
    """The text of `key` in `lang` (en or zh)."""
    en, zh = STRINGS[key]
    return zh if lang == "zh" else en
